"""Kaldi log-mel filterbank features, as the reference computes them, in numpy.

The reference calls ``torchaudio.compliance.kaldi.fbank(waveform - waveform.mean(), htk_compat=True,
sample_frequency=16000, use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0,
frame_shift=10)`` and keeps every other Kaldi default: 25 ms frames, snip_edges, per-frame DC removal,
pre-emphasis 0.97, FFT size 512, power spectrum, mel bins from 20 Hz to Nyquist, natural log floored at
float32 epsilon. ``log_mel_fbank`` reproduces that (checked against ``fixtures/reference/fbank.pt``);
``fbank_to_model_input`` is the reference's pad/cut to 256 frames and AudioSet normalisation.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # samples: 25 ms at 16 kHz
FRAME_SHIFT = 160  # samples: 10 ms at 16 kHz
FRAMES_PER_SECOND = SAMPLE_RATE / FRAME_SHIFT  # 100 fbank frames per second
N_FFT = 512
NUM_MEL_BINS = 128
LOW_FREQ = 20.0
PREEMPHASIS = 0.97
NORM_MEAN = -4.2677393
NORM_STD = 4.5689974
TARGET_LENGTH = 256
_EPS = np.finfo(np.float32).eps


def _mel(freq: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + freq / 700.0)


@lru_cache(maxsize=4)
def mel_banks(sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Kaldi's triangular mel filters on the FFT bins: (NUM_MEL_BINS, N_FFT // 2 + 1) float32."""
    high_freq = sample_rate / 2
    mel_low, mel_high = _mel(np.float64(LOW_FREQ)), _mel(np.float64(high_freq))
    delta = (mel_high - mel_low) / (NUM_MEL_BINS + 1)
    bins = np.arange(NUM_MEL_BINS, dtype=np.float64)[:, None]
    left, center, right = mel_low + bins * delta, mel_low + (bins + 1) * delta, mel_low + (bins + 2) * delta
    fft_mel = _mel(sample_rate / N_FFT * np.arange(N_FFT // 2, dtype=np.float64))[None, :]
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))
    banks = np.pad(banks, ((0, 0), (0, 1)))  # Kaldi leaves the Nyquist bin out of every filter
    return banks.astype(np.float32)


@lru_cache(maxsize=1)
def _hanning() -> np.ndarray:
    """Kaldi's "hanning" window, 0.5 - 0.5 cos(2 pi n / (N - 1)): (FRAME_LENGTH,) float32."""
    n = np.arange(FRAME_LENGTH, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / (FRAME_LENGTH - 1))).astype(np.float32)


def _frames(waveform: np.ndarray) -> np.ndarray:
    """Cut (samples,) into overlapping frames (snip_edges): (1 + (samples - 400) // 160, 400)."""
    count = 1 + (len(waveform) - FRAME_LENGTH) // FRAME_SHIFT
    view = np.lib.stride_tricks.sliding_window_view(waveform, FRAME_LENGTH)
    return view[: count * FRAME_SHIFT : FRAME_SHIFT]


def log_mel_fbank(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Reference log-mel features of a mono waveform.

    waveform: (samples,) or (1, samples) float, 16 kHz, values in [-1, 1].
    Returns (frames, 128) float32 with frames = 1 + (samples - 400) // 160; frame i starts at i * 10 ms.
    """
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"log_mel_fbank expects {SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
    wave = np.asarray(waveform, dtype=np.float32).reshape(-1)
    if len(wave) < FRAME_LENGTH:
        raise ValueError(f"waveform has {len(wave)} samples, fewer than one {FRAME_LENGTH}-sample frame")
    wave = wave - wave.mean(dtype=np.float64).astype(np.float32)
    frames = _frames(wave).astype(np.float32)
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - PREEMPHASIS * previous) * _hanning()
    spectrum = np.fft.rfft(frames, n=N_FFT, axis=1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    energies = power @ mel_banks(sample_rate).T
    return np.log(np.maximum(energies, _EPS)).astype(np.float32)


def fbank_to_model_input(fbank: np.ndarray, target_length: int = TARGET_LENGTH) -> np.ndarray:
    """Pad with zero rows (log-mel domain) or cut to ``target_length``, then AudioSet-normalise.

    fbank: (frames, 128). Returns (1, target_length, 128) float32.
    """
    fbank = np.asarray(fbank, dtype=np.float32)
    out = np.zeros((target_length, fbank.shape[1]), dtype=np.float32)
    keep = min(target_length, len(fbank))
    out[:keep] = fbank[:keep]
    out = (out - np.float32(NORM_MEAN)) / np.float32(2 * NORM_STD)
    return out[None]
