"""Batch-level Mixup / CutMix with the reversed batch as partner, and their smoothed soft targets.

The random draws happen on the host (``draw_mix``, from the step's generator), the mixing on the device as
weights (``apply_mix``): the same ops every step, so a compiled training step never sees a new shape.

Mixup (alpha 0.8) or CutMix (alpha 1.0), switch probability 0.5, and label smoothing 0.1. The reference mixes
only the video while it mixes the labels; ``mix_audio=True`` also mixes the audio (same lambda for Mixup; for
CutMix a contiguous time span of the partner's log-mel, covering the same fraction of time as the video box
covers of the frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...config.augment import AugmentConfig


def smoothed_one_hot(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) int -> (B, K): 1 - smoothing + smoothing/K on the class, smoothing/K elsewhere."""
    off = smoothing / num_classes
    out = torch.full((targets.shape[0], num_classes), off, dtype=torch.float32, device=targets.device)
    return out.scatter_(1, targets.long().view(-1, 1), 1.0 - smoothing + off)


def mix_targets(targets: torch.Tensor, num_classes: int, lam: float | torch.Tensor, smoothing: float,
                other: float | torch.Tensor | None = None) -> torch.Tensor:
    """(B,) int -> (B, K) soft targets: lam * own smoothed one-hot + (1 - lam) * the reversed batch's. ``other`` is
    1 - lam, when given as a tensor of its own (``MixDraw``: computed in float64, then cast)."""
    own = smoothed_one_hot(targets, num_classes, smoothing)
    return own * lam + own.flip(0) * (1.0 - lam if other is None else other)


def sample_mix(rng: np.random.Generator, cfg: AugmentConfig) -> tuple[float, bool]:
    """Draw (lam, use_cutmix) for one batch; lam = 1.0 means no mixing."""
    if not cfg.mixup or rng.random() >= cfg.mix_prob:
        return 1.0, False
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        use_cutmix = bool(rng.random() < cfg.switch_prob)
    elif cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        use_cutmix = cfg.cutmix_alpha > 0
    else:
        return 1.0, False
    alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
    return float(rng.beta(alpha, alpha)), use_cutmix


def sample_cutmix_box(rng: np.random.Generator, height: int, width: int,
                      lam: float) -> tuple[tuple[int, int, int, int], float]:
    """CutMix box (y0, y1, x0, x1) of sides sqrt(1 - lam) of the frame around a uniform centre, clipped to the
    frame, and lam corrected to 1 - (clipped box area) / (frame area)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    corrected = 1.0 - float((y1 - y0) * (x1 - x0)) / (height * width)
    return (int(y0), int(y1), int(x0), int(x1)), corrected


def sample_time_span(rng: np.random.Generator, length: int, fraction: float) -> tuple[int, int]:
    """A contiguous span [t0, t1) covering round(fraction * length) steps at a uniform position."""
    span = int(round(fraction * length))
    start = int(rng.integers(0, length - span + 1))
    return start, start + span


@dataclass(frozen=True)
class MixDraw:
    """One batch's Mixup/CutMix as weights, drawn on the host, applied on the device with the same few ops whatever
    was drawn (no data-dependent shapes, nothing a compiled step would recompile for): every sample becomes
    ``keep * own + take * partner's``, the partner being the reversed batch.

    video_keep, video_take (H, W): Mixup fills them with lam and 1 - lam, CutMix with 0 and 1 inside its box and 1
    and 0 outside, no mixing with 1 and 0; audio_keep, audio_take (T,) likewise over the log-mel's time axis (only
    with ``mix_audio``); target_keep, target_take () the (corrected) lam and 1 - lam of the soft targets. Each
    ``take`` is 1 - ``keep`` computed in float64 and then cast, so the result equals slicing and pasting (CutMix)
    and ``lam * a + (1 - lam) * b`` (Mixup) bit for bit.
    """

    video_keep: np.ndarray
    video_take: np.ndarray
    audio_keep: np.ndarray | None
    audio_take: np.ndarray | None
    target_keep: np.ndarray
    target_take: np.ndarray

    def tensors(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The weights as float32 tensors on ``device`` (``apply_mix`` takes them)."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__ if getattr(self, name) is not None}
        return {f"mix/{name}": torch.from_numpy(np.asarray(value, np.float32)).to(device, non_blocking=True)
                for name, value in fields.items()}


def _weights(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.asarray(keep, np.float64)
    return keep.astype(np.float32), (1.0 - keep).astype(np.float32)


def draw_mix(rng: np.random.Generator, cfg: AugmentConfig, height: int, width: int,
             audio_frames: int) -> MixDraw:
    """A batch's Mixup/CutMix weights for frames of ``height`` x ``width`` and ``audio_frames`` log-mel frames."""
    lam, use_cutmix = sample_mix(rng, cfg)
    video_keep = np.full((height, width), lam)
    audio_keep = np.full(audio_frames, lam if cfg.mix_audio else 1.0)
    if lam < 1.0 and use_cutmix:
        (y0, y1, x0, x1), lam = sample_cutmix_box(rng, height, width, lam)
        video_keep = np.ones((height, width))
        video_keep[y0:y1, x0:x1] = 0.0
        audio_keep = np.ones(audio_frames)
        if cfg.mix_audio:
            t0, t1 = sample_time_span(rng, audio_frames, 1.0 - lam)
            audio_keep[t0:t1] = 0.0
    audio = _weights(audio_keep) if cfg.mix_audio else (None, None)
    return MixDraw(*_weights(video_keep), *audio, *_weights(np.asarray(lam)))


def apply_mix(video: torch.Tensor, audio: torch.Tensor, targets: torch.Tensor, num_classes: int, smoothing: float,
              weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """video (B, 3, T, H, W), audio (B, 1, T_a, M), targets (B,) int and a batch's ``MixDraw.tensors`` -> (mixed
    video, audio, soft targets (B, K) float32). Inputs are not modified."""
    if video.shape[0] % 2:
        raise ValueError(f"Mixup/CutMix pairs each sample with the reversed batch; batch size {video.shape[0]} "
                         "must be even")
    video = video * weights["mix/video_keep"] + video.flip(0) * weights["mix/video_take"]
    if "mix/audio_keep" in weights:
        keep, take = (weights[f"mix/audio_{name}"].view(1, 1, -1, 1) for name in ("keep", "take"))
        audio = audio * keep + audio.flip(0) * take
    soft = mix_targets(targets, num_classes, weights["mix/target_keep"], smoothing, weights["mix/target_take"])
    return video, audio, soft


def mixup_cutmix(video: torch.Tensor, audio: torch.Tensor, targets: torch.Tensor, num_classes: int,
                 cfg: AugmentConfig | None = None,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-level Mixup/CutMix with the reversed batch as partner: ``draw_mix`` then ``apply_mix``.

    video (B, 3, T, H, W), audio (B, 1, T_a, M) log-mel (time on dim 2), targets (B,) int ->
    (mixed video, audio, soft targets (B, num_classes) float32). Inputs are not modified.

    CutMix pastes the same box in every frame and corrects lam by the clipped box area. With ``cfg.mix_audio``
    the audio is mixed too: Mixup with the same lam; CutMix replaces a contiguous time span covering the fraction
    1 - lam of the partner's audio. Otherwise (the reference) the audio is returned unchanged."""
    cfg = cfg or AugmentConfig()
    rng = rng if rng is not None else np.random.default_rng()
    draw = draw_mix(rng, cfg, video.shape[-2], video.shape[-1], audio.shape[2])
    return apply_mix(video, audio, targets, num_classes, cfg.label_smoothing, draw.tensors(video.device))
