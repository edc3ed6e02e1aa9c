"""Training examples: one clip (as a shard holds it) -> the model-ready windows of one training example.

A clip in a shard holds all its face frames (at ``meta.fps``) and its whole log-mel fbank (``meta.fbank_rate``
frames per second). A training window is ``num_frames`` frames taken every ``sampling_rate`` frames (16 x 4 =
64 frames = 2.56 s at 25 fps) and the fbank frames of the same time span, padded or cut to 256 frames and
normalised as the reference does. Pre-training windows carry their masks, drawn here in the loader.

A window's video leaves the loader as uint8 frames of the model's side (the shards' crops are; others are resized
with PIL first) with the geometry the training device applies to them (``pipeline.data.video_batch``): pre-training's
multi-scale crop box, fine-tuning's resized crop, flip and erasing.

Every random draw of an example comes from ``sample_rng(clip key, epoch, seed)``, so an example is the same
whichever rank or loader worker makes it. ``pipeline.data.loaders`` decides which clips are read, and in which order.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from model import HiCMAEConfig, random_mask, tube_mask
from preprocessing.fbank import fbank_to_model_input
from preprocessing.shards import ClipSample, fbank_window

from ..config.training import WindowSettings
from .augment import AugmentConfig, eval_video_fields, train_video_fields
from .augment.transforms import resize_clip
from .video_batch import Box, video_fields

PRETRAIN_SCALES = (1.0, 0.875, 0.75, 0.66)


def window_starts(num_clip_frames: int, span: int, views: int) -> list[int]:
    """Deterministic start frames of ``views`` windows spread from the clip's start to its end."""
    last = max(num_clip_frames - span, 0)
    if views == 1:
        return [last // 2]
    return [round(i * last / (views - 1)) for i in range(views)]


def frame_indices(num_clip_frames: int, start: int, window: WindowSettings) -> np.ndarray:
    """(num_frames,) frame indices from ``start`` every ``sampling_rate``, held at the last frame at the end."""
    idx = start + np.arange(window.num_frames) * window.sampling_rate
    return np.minimum(idx, num_clip_frames - 1)


def audio_window(clip: ClipSample, start: int, window: WindowSettings) -> np.ndarray:
    """(1, audio_frames, 128) normalised fbank for the time span of the video window starting at ``start``."""
    first, last = fbank_window(start, start + window.span, clip.meta["fps"], clip.meta["fbank_rate"])
    return fbank_to_model_input(clip.fbank[first:last], window.audio_frames)


def sample_rng(key: str, epoch: int, seed: int) -> np.random.Generator:
    """A per-sample, per-epoch generator: reproducible windows, augmentations and masks in any worker."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()[:8],
                                                "little"))


def random_start(num_clip_frames: int, window: WindowSettings, rng: np.random.Generator) -> int:
    """A uniformly random first frame of a training window (0 when the clip is shorter than the window)."""
    return int(rng.integers(0, max(num_clip_frames - window.span, 0) + 1))


def multi_scale_crop(height: int, width: int, rng: np.random.Generator) -> Box:
    """The reference's multi-scale crop (top, left, h, w): sides of scale 1/.875/.75/.66 of the frame's, the two
    scales at most one step apart, at a uniform position. The device resizes it back to the frame's size."""
    i = rng.integers(len(PRETRAIN_SCALES))
    j = min(max(i + rng.integers(-1, 2), 0), len(PRETRAIN_SCALES) - 1)
    crop_h, crop_w = int(height * PRETRAIN_SCALES[i]), int(width * PRETRAIN_SCALES[j])
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return top, left, crop_h, crop_w


def pretrain_examples(clip: ClipSample, epoch: int, *, window: WindowSettings, cfg: HiCMAEConfig,
                      seed: int) -> list[dict]:
    """One pre-training window of a clip with a random start, crop and masks."""
    rng = sample_rng(clip.key, epoch, seed)
    start = random_start(len(clip.frames), window, rng)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    frames = resize_clip(clip.frames[frame_indices(len(clip.frames), start, window)], cfg.img_size)  # (T, S, S, 3)
    return [{
        **video_fields(frames, crop=multi_scale_crop(cfg.img_size, cfg.img_size, rng)),
        "audio": audio_window(clip, start, window),
        "mask_video": tube_mask(1, cfg.video_grid, cfg.mask_ratio, generator)[0].numpy(),
        "mask_audio": random_mask(1, cfg.num_audio_tokens, cfg.audio_mask_ratio, generator)[0].numpy(),
    }]


def label_fields(meta: dict) -> dict:
    """Labels as fixed-type columns: ``label`` (int, -1 if none) and ``targets`` (float32 vector, maybe empty)."""
    return {"label": int(meta["label"]) if meta.get("label") is not None else -1,
            "targets": np.asarray(meta.get("targets") or [], dtype=np.float32)}


def finetune_train_examples(clip: ClipSample, epoch: int, *, window: WindowSettings, augment: AugmentConfig,
                            seed: int) -> list[dict]:
    """One augmented training window (random start) of a labelled clip."""
    rng = sample_rng(clip.key, epoch, seed)
    start = random_start(len(clip.frames), window, rng)
    frames = clip.frames[frame_indices(len(clip.frames), start, window)]
    return [{**train_video_fields(frames, rng, augment), "audio": audio_window(clip, start, window),
             **label_fields(clip.meta)}]


def finetune_eval_examples(clip: ClipSample, epoch: int, *, window: WindowSettings, views: int) -> list[dict]:
    """``views`` deterministic windows spread over the clip, each tagged with the clip id and view index."""
    examples = []
    for view, start in enumerate(window_starts(len(clip.frames), window.span, views)):
        frames = clip.frames[frame_indices(len(clip.frames), start, window)]
        examples.append({**eval_video_fields(frames), "audio": audio_window(clip, start, window),
                         "clip_id": clip.meta["clip_id"], "view": view, **label_fields(clip.meta)})
    return examples
