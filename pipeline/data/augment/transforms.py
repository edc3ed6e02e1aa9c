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

Steps 1 and 2 run in the loader on uint8 frames (``train_video_fields``, ``eval_video_fields``), which also draw the
parameters of steps 4-6; steps 3-6 run on the training device, batched (``pipeline.data.video_batch.video_to_model``).
``train_video_transform`` and ``eval_video_transform`` are both halves for one clip.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ...config.augment import AugmentConfig
from ..video_batch import Box, example_video, uint8_clip, video_fields
from .rand_augment import apply_rand_augment, sample_rand_augment


def resize_clip(frames: np.ndarray, size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size, size, 3) uint8 with PIL bilinear resampling (aspect not kept)."""
    frames = uint8_clip(frames)
    if frames.shape[1:3] == (size, size):
        return frames
    out = np.empty((frames.shape[0], size, size, 3), dtype=np.uint8)
    for t, frame in enumerate(frames):
        out[t] = np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BILINEAR))
    return out


def sample_resized_crop(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                        ratio: tuple[float, float], attempts: int = 10) -> Box:
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


def sample_erase_box(rng: np.random.Generator, height: int, width: int, area_range: tuple[float, float],
                     aspect_range: tuple[float, float], attempts: int = 100) -> Box | None:
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


def train_video_fields(frames: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig | None = None) -> dict:
    """The loader's half of the training augmentation of one clip: (T, H, W, 3) uint8 RGB -> the example's video
    entries (``video_batch.video_fields``): (T, S, S, 3) uint8 frames resized and RandAugmented, S =
    cfg.input_size, with the resized crop, flip and erasing (box and noise seed) that the device applies.

    Every random parameter is drawn once per clip from ``rng``, so all frames are transformed alike."""
    cfg = cfg or AugmentConfig()
    size = cfg.input_size
    frames = resize_clip(frames, size)
    if cfg.rand_augment:
        frames = apply_rand_augment(frames, sample_rand_augment(rng, cfg), cfg.increasing)
    crop = sample_resized_crop(rng, size, size, cfg.rrc_scale, cfg.rrc_ratio) if cfg.random_resized_crop else None
    flip = bool(cfg.flip and rng.random() < cfg.flip_prob)
    erase: Box | None = None
    noise_seed = 0
    if cfg.random_erase and rng.random() < cfg.erase_prob:
        erase = sample_erase_box(rng, size, size, cfg.erase_area, cfg.erase_aspect)
        if erase is not None:
            noise_seed = int(rng.integers(2**63))
    return video_fields(frames, crop=crop, flip=flip, erase=erase, noise_seed=noise_seed)


def eval_video_fields(frames: np.ndarray, size: int = 160) -> dict:
    """The loader's half of the evaluation transform: (T, H, W, 3) uint8 -> the example's video entries, frames
    resized to (T, size, size, 3) with PIL bilinear (the reference's centre crop is a no-op after the square
    resize)."""
    return video_fields(resize_clip(frames, size))


def train_video_transform(frames: np.ndarray, rng: np.random.Generator,
                          cfg: AugmentConfig | None = None) -> torch.Tensor:
    """Training augmentation of one clip, both halves: (T, H, W, 3) uint8 RGB -> (3, T, S, S) float32."""
    return example_video(train_video_fields(frames, rng, cfg))


def eval_video_transform(frames: np.ndarray, size: int = 160) -> torch.Tensor:
    """Deterministic evaluation transform of one clip, both halves: (T, H, W, 3) uint8 -> (3, T, size, size)
    float32 (PIL bilinear resize, ImageNet normalisation)."""
    return example_video(eval_video_fields(frames, size))
