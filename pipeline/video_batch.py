"""A training example's video between the loader and the model.

Loader workers hand over each window's frames as decoded, (T, H, W, 3) uint8 (16 x 160 x 160 x 3 = 1.2 MB, a
quarter of the float32 video), with the clip's ``Geometry`` drawn from the example's ``sample_rng``
(``video_fields``): the box to crop and resize back to the frame's size (pre-training's multi-scale crop,
fine-tuning's random resized crop; the whole frame otherwise), a horizontal flip, and a box to fill with per-pixel
N(0, 1) noise, with the seed of that noise (fine-tuning's random erasing).

``video_to_model`` does the rest on the training device, batched: cast, ImageNet normalisation, crop and resize
(bilinear, half-pixel centres, no antialiasing), flip, erasing -> (B, 3, T, H, W) float32, the model's input.
``device_batch`` moves a whole loader batch that way; every path from a loader to the model goes through it
(training, evaluation, prediction, the benchmarks), and a model handed the uint8 video would fail at once.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from model.constants import IMAGENET_MEAN, IMAGENET_STD

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels

VIDEO, GEOMETRY = "video", "video_geometry"


class Geometry(NamedTuple):
    """What the device does to one clip's normalised frames, in this order: resize ``crop`` back to the frame's
    size, ``flip`` left-right, fill ``erase`` (height 0: nothing) with N(0, 1) noise drawn from ``noise_seed``."""

    crop: Box
    flip: bool
    erase: Box
    noise_seed: int

    def row(self) -> np.ndarray:
        """(10,) int64: how an example carries it (one small array a batch, not four)."""
        return np.array([*self.crop, self.flip, *self.erase, self.noise_seed], dtype=np.int64)

    @classmethod
    def from_row(cls, row: list[int]) -> Geometry:
        return cls(tuple(row[0:4]), bool(row[4]), tuple(row[5:9]), row[9])

    def changes(self, height: int, width: int) -> bool:
        """Whether it changes a frame of this size at all."""
        return self.crop != (0, 0, height, width) or self.flip or self.erase[2] > 0


def uint8_clip(frames: np.ndarray) -> np.ndarray:
    """``frames`` checked to be a (T, H, W, 3) uint8 RGB clip, C-contiguous."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    return np.ascontiguousarray(frames)


def video_fields(frames: np.ndarray, *, crop: Box | None = None, flip: bool = False, erase: Box | None = None,
                 noise_seed: int = 0) -> dict:
    """An example's video entries: the (T, H, W, 3) uint8 frames and their ``Geometry`` row. ``crop`` None keeps
    the whole frame; ``erase`` None erases nothing."""
    frames = uint8_clip(frames)
    height, width = frames.shape[1:3]
    geometry = Geometry(crop or (0, 0, height, width), flip, erase or (0, 0, 0, 0), noise_seed)
    return {VIDEO: frames, GEOMETRY: geometry.row()}


def normalize(video: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float32: v / 255, then ImageNet mean/std per channel."""
    mean = torch.tensor(IMAGENET_MEAN, device=video.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=video.device).view(1, 3, 1, 1, 1)
    return video.permute(0, 4, 1, 2, 3).contiguous().float().div_(255.0).sub_(mean).div_(std)


def resized_crop(video: torch.Tensor, box: Box) -> torch.Tensor:
    """(C, T, H, W) -> (C, T, H, W): ``box`` of every frame resized to the frame's size, bilinear (half-pixel
    centres, no antialiasing); the whole frame comes back as it is."""
    top, left, h, w = box
    size = video.shape[-2:]
    if (h, w) == tuple(size):
        return video
    return F.interpolate(video[:, :, top:top + h, left:left + w], size=size, mode="bilinear", align_corners=False)


def erase(video: torch.Tensor, box: Box, seed: int) -> torch.Tensor:
    """In place on (C, T, H, W): fill ``box`` of every frame with per-pixel N(0, 1) noise (fresh for every frame
    and channel), drawn on the video's device from ``seed``."""
    top, left, h, w = box
    generator = torch.Generator(device=video.device).manual_seed(seed)
    shape = (video.shape[0], video.shape[1], h, w)
    video[:, :, top:top + h, left:left + w] = torch.randn(shape, generator=generator, device=video.device,
                                                          dtype=video.dtype)
    return video


def apply_geometry(video: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """One normalised clip (C, T, H, W): resized crop, then flip, then erasing, the reference's order."""
    video = resized_crop(video, geometry.crop)
    if geometry.flip:
        video = video.flip(-1)
    if geometry.erase[2] > 0:
        video = erase(video.contiguous(), geometry.erase, geometry.noise_seed)
    return video


def video_to_model(batch: dict, device: torch.device | str) -> torch.Tensor:
    """A loader batch's video as the model takes it, on ``device``: ``video`` (B, T, H, W, 3) uint8 with its
    ``video_geometry`` (B, 10) (a host tensor, so reading it costs no device sync) -> (B, 3, T, H, W) float32."""
    video = normalize(batch[VIDEO].to(device, non_blocking=True))
    for b, row in enumerate(batch[GEOMETRY].tolist()):
        geometry = Geometry.from_row(row)
        if geometry.changes(*video.shape[-2:]):
            video[b] = apply_geometry(video[b], geometry)
    return video


def device_batch(batch: dict, device: torch.device | str) -> dict:
    """A loader batch as a model step takes it: the video through ``video_to_model``, every other tensor moved to
    ``device``, anything else (clip ids) as it is; the geometry is used up."""
    moved = {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
             for key, value in batch.items() if key not in (VIDEO, GEOMETRY)}
    moved[VIDEO] = video_to_model(batch, device)  # the video's one trip to the device
    return moved


def example_video(fields: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """One example's video as the model takes it, (3, T, H, W) float32: ``video_to_model`` of a batch of one."""
    batch = {key: torch.as_tensor(np.asarray(fields[key]))[None] for key in (VIDEO, GEOMETRY)}
    return video_to_model(batch, device)[0]
