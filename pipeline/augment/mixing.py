"""Batch-level Mixup / CutMix with the reversed batch as partner, and their smoothed soft targets.

Mixup (alpha 0.8) or CutMix (alpha 1.0), switch probability 0.5, and label smoothing 0.1. The reference mixes
only the video while it mixes the labels; ``mix_audio=True`` also mixes the audio (same lambda for Mixup; for
CutMix a contiguous time span of the partner's log-mel, covering the same fraction of time as the video box
covers of the frame).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import AugmentConfig


def smoothed_one_hot(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) int -> (B, K): 1 - smoothing + smoothing/K on the class, smoothing/K elsewhere."""
    off = smoothing / num_classes
    out = torch.full((targets.shape[0], num_classes), off, dtype=torch.float32, device=targets.device)
    return out.scatter_(1, targets.long().view(-1, 1), 1.0 - smoothing + off)


def mix_targets(targets: torch.Tensor, num_classes: int, lam: float, smoothing: float) -> torch.Tensor:
    """(B,) int -> (B, K) soft targets: lam * own smoothed one-hot + (1 - lam) * the reversed batch's."""
    own = smoothed_one_hot(targets, num_classes, smoothing)
    return own * lam + own.flip(0) * (1.0 - lam)


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


def mixup_cutmix(video: torch.Tensor, audio: torch.Tensor, targets: torch.Tensor, num_classes: int,
                 cfg: AugmentConfig | None = None,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-level Mixup/CutMix with the reversed batch as partner.

    video (B, 3, T, H, W), audio (B, 1, T_a, M) log-mel (time on dim 2), targets (B,) int ->
    (mixed video, audio, soft targets (B, num_classes) float32). Inputs are not modified.

    CutMix pastes the same box in every frame and corrects lam by the clipped box area. With ``cfg.mix_audio``
    the audio is mixed too: Mixup with the same lam; CutMix replaces a contiguous time span covering the fraction
    1 - lam of the partner's audio. Otherwise (the reference) the audio is returned unchanged."""
    cfg = cfg or AugmentConfig()
    rng = rng if rng is not None else np.random.default_rng()
    if video.shape[0] % 2:
        raise ValueError(f"Mixup/CutMix pairs each sample with the reversed batch; batch size {video.shape[0]} "
                         "must be even")
    lam, use_cutmix = sample_mix(rng, cfg)
    if lam < 1.0:
        if use_cutmix:
            (y0, y1, x0, x1), lam = sample_cutmix_box(rng, video.shape[-2], video.shape[-1], lam)
            video = video.clone()
            video[..., y0:y1, x0:x1] = video.flip(0)[..., y0:y1, x0:x1]
            if cfg.mix_audio:
                t0, t1 = sample_time_span(rng, audio.shape[2], 1.0 - lam)
                audio = audio.clone()
                audio[:, :, t0:t1] = audio.flip(0)[:, :, t0:t1]
        else:
            video = video * lam + video.flip(0) * (1.0 - lam)
            if cfg.mix_audio:
                audio = audio * lam + audio.flip(0) * (1.0 - lam)
    return video, audio, mix_targets(targets, num_classes, lam, cfg.label_smoothing)
