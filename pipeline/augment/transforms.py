"""Clip transforms of fine-tuning: training augmentation and the deterministic evaluation transform.

Training, per clip (every frame of a window shares the same random parameters):

1. resize every frame to ``input_size`` x ``input_size`` (PIL bilinear, aspect not kept);
2. RandAugment (``rand_augment.py``);
3. to float in [0, 1], ImageNet mean/std normalisation, layout (3, T, H, W);
4. random resized crop (scale 0.08-1, log-uniform ratio 0.75-1.3333, 10 tries then centre fallback), bilinear;
5. horizontal flip p=0.5;
6. random erasing p=0.25: one box (area 2%-1/3, log-uniform aspect 0.3-3.33) at the same place in every frame,
   filled with per-pixel N(0, 1) noise drawn afresh for every frame (the reference's cube mode shares the box,
   not the noise).

Evaluation: steps 1 and 3 only.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.constants import IMAGENET_MEAN, IMAGENET_STD

from .config import AugmentConfig
from .rand_augment import apply_rand_augment, sample_rand_augment


def _check_clip(frames: np.ndarray) -> np.ndarray:
    """Validate a (T, H, W, 3) uint8 RGB clip and return it C-contiguous."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    return np.ascontiguousarray(frames)


def resize_clip(frames: np.ndarray, size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size, size, 3) uint8 with PIL bilinear resampling (aspect not kept)."""
    frames = _check_clip(frames)
    if frames.shape[1:3] == (size, size):
        return frames
    out = np.empty((frames.shape[0], size, size, 3), dtype=np.uint8)
    for t, frame in enumerate(frames):
        out[t] = np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BILINEAR))
    return out


def _normalization_table() -> np.ndarray:
    """(3, 256) float32: (v / 255 - mean_c) / std_c for every channel c and value v, in float32 arithmetic."""
    values = torch.arange(256, dtype=torch.float32).div(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1)
    return ((values - mean) / std).numpy()


_NORMALIZATION = _normalization_table()


def normalize_clip(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float32: v / 255, then ImageNet mean/std per channel.

    Split into channel planes, then one table lookup per plane (exactly the float32 arithmetic above)."""
    t, h, w, _ = frames.shape
    out = np.empty((3, t * h, w), dtype=np.float32)
    for channel, plane in enumerate(cv2.split(frames.reshape(t * h, w, 3))):
        cv2.LUT(plane, _NORMALIZATION[channel].reshape(1, 256), dst=out[channel])
    return torch.from_numpy(out.reshape(3, t, h, w))


def sample_resized_crop(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                        ratio: tuple[float, float], attempts: int = 10) -> tuple[int, int, int, int]:
    """Inception-style crop box (top, left, h, w): area fraction uniform in ``scale``, aspect w/h log-uniform in
    ``ratio``; after ``attempts`` misses, the largest centred box whose aspect lies within ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(video: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """(C, T, H, W) -> (C, T, size, size): crop ``box`` = (top, left, h, w) from every frame, bilinear resize
    (half-pixel centres, no antialiasing)."""
    top, left, h, w = box
    crop = video[:, :, top:top + h, left:left + w]
    if crop.shape[-2:] == (size, size):
        return crop.contiguous()
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)


def sample_erase_box(rng: np.random.Generator, height: int, width: int, area_range: tuple[float, float],
                     aspect_range: tuple[float, float], attempts: int = 100) -> tuple[int, int, int, int] | None:
    """Erasing box (top, left, h, w) with area fraction uniform in ``area_range`` and aspect h/w log-uniform in
    ``aspect_range``, strictly smaller than the frame; None when every attempt misses."""
    log_aspect = (math.log(aspect_range[0]), math.log(aspect_range[1]))
    for _ in range(attempts):
        target_area = rng.uniform(*area_range) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if 0 < w < width and 0 < h < height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def erase_box(video: torch.Tensor, box: tuple[int, int, int, int], rng: np.random.Generator) -> torch.Tensor:
    """In place on (C, T, H, W): fill ``box`` of every frame with fresh per-pixel N(0, 1) noise."""
    top, left, h, w = box
    channels, frames = video.shape[:2]
    noise = rng.standard_normal((channels, frames, h, w), dtype=np.float32)
    video[:, :, top:top + h, left:left + w] = torch.from_numpy(noise)
    return video


def train_video_transform(frames: np.ndarray, rng: np.random.Generator,
                          cfg: AugmentConfig | None = None) -> torch.Tensor:
    """Training augmentation of one clip: (T, H, W, 3) uint8 RGB -> (3, T, S, S) float32, S = cfg.input_size.

    Every random parameter is drawn once per clip from ``rng``, so all frames are transformed alike."""
    cfg = cfg or AugmentConfig()
    size = cfg.input_size
    frames = resize_clip(frames, size)
    if cfg.rand_augment:
        frames = apply_rand_augment(frames, sample_rand_augment(rng, cfg), cfg.increasing)
    video = normalize_clip(frames)
    if cfg.random_resized_crop:
        video = resized_crop(video, sample_resized_crop(rng, size, size, cfg.rrc_scale, cfg.rrc_ratio), size)
    if cfg.flip and rng.random() < cfg.flip_prob:
        video = video.flip(-1)
    if cfg.random_erase and rng.random() < cfg.erase_prob:
        box = sample_erase_box(rng, size, size, cfg.erase_area, cfg.erase_aspect)
        if box is not None:
            video = erase_box(video.contiguous(), box, rng)
    return video.contiguous()


def eval_video_transform(frames: np.ndarray, size: int = 160) -> torch.Tensor:
    """Deterministic evaluation transform: (T, H, W, 3) uint8 -> (3, T, size, size) float32 (PIL bilinear
    resize, ImageNet normalisation; the reference's centre crop is a no-op after the square resize)."""
    return normalize_clip(resize_clip(frames, size))
