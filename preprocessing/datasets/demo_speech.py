"""The demo dataset's sounds: speech synthesised by espeak-ng, voice per speaker, prosody per emotion.

Each speaker gets an espeak-ng voice variant and a base pitch; each emotion class a pitch shift, speaking
rate, loudness and pause length, so the class can be heard regardless of the sentence or the speaker.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOICES = ["en-us+m1", "en-us+f2", "en-gb+m3", "en-gb+f4", "en-us+m5", "en-us+f1", "en-gb+m7", "en-gb+f3",
          "en-us+m2", "en-gb+f5", "en-us+m4", "en-gb+f1"]
SENTENCES = [
    "The boxes are in the kitchen by the door.",
    "I will take the early train tomorrow.",
    "We talked about it on the phone yesterday.",
    "The meeting starts at nine in the morning.",
    "Put the blue folder on the table.",
    "She said the shop was closed today.",
    "It is going to rain this afternoon.",
    "They painted the fence last weekend.",
]
PROSODY_OF_CLASS = {  # pitch shift, words per minute, amplitude (espeak 0-200), word gap (10 ms units)
    "neutral": (0, 160, 90, 0),
    "happy": (28, 190, 120, 0),
    "angry": (-8, 215, 190, 0),
    "sad": (-25, 115, 45, 14),
}


@dataclass(frozen=True)
class Voice:
    """One speaker's voice: the espeak-ng voice name and base pitch (0-99 scale)."""

    name: str
    pitch: int


def random_voice(index: int, rng: np.random.Generator) -> Voice:
    """The ``index``-th speaker's voice: a distinct variant and a base pitch drawn from ``rng``."""
    return Voice(name=VOICES[index % len(VOICES)], pitch=int(rng.integers(35, 60)))


def espeak_command(voice: Voice, emotion: str, text: str, wav_path: Path) -> list[str]:
    """The espeak-ng command line that speaks ``text`` in ``voice`` with the prosody of ``emotion``."""
    pitch_shift, speed, amplitude, gap = PROSODY_OF_CLASS[emotion]
    pitch = int(np.clip(voice.pitch + pitch_shift, 0, 99))
    return ["espeak-ng", "-v", voice.name, "-p", str(pitch), "-s", str(speed), "-a", str(amplitude),
            "-g", str(gap), "-w", str(wav_path), text]


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit mono WAV file as float32 samples in [-1, 1] and its sample rate."""
    with wave.open(str(path), "rb") as handle:
        rate = handle.getframerate()
        samples = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    return samples.astype(np.float32) / 32768.0, rate


def fit_length(samples: np.ndarray, length: int, rate: int, lead_in: float = 0.15) -> np.ndarray:
    """Place speech after a short silence, cut or pad it to ``length`` samples, fade the edges."""
    lead = int(lead_in * rate)
    out = np.zeros(length, np.float32)
    take = min(len(samples), length - lead)
    out[lead:lead + take] = samples[:take]
    fade = min(int(0.02 * rate), length // 4)
    out[-fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    return out


def synthesise(voice: Voice, emotion: str, text: str, duration: float) -> tuple[np.ndarray, int]:
    """Speak ``text`` and return exactly ``duration`` seconds of mono float32 audio and its rate."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as folder:
        wav_path = Path(folder) / "speech.wav"
        subprocess.run(espeak_command(voice, emotion, text, wav_path), check=True, capture_output=True)
        samples, rate = read_wav(wav_path)
    return fit_length(samples, int(round(duration * rate)), rate), rate
