"""A training example's video between the loader and the model.

Loader workers hand over each window's frames as decoded, (T, H, W, 3) uint8 (16 x 160 x 160 x 3 = 1.2 MB, a
quarter of the float32 video), with the clip's ``Geometry`` drawn from the example's ``sample_rng``
(``video_fields``): the box to crop and resize back to the frame's size (pre-training's multi-scale crop,
fine-tuning's random resized crop; the whole frame otherwise), a horizontal flip, and a box to fill with per-pixel
N(0, 1) noise, with the seed of that noise (fine-tuning's random erasing).

``video_to_model`` does the rest on the training device, for the whole batch at once in a fixed number of ops
whatever its size (about one kernel launch each on a GPU), in the reference's order -> (B, 3, T, H, W) float32,
the model's input:

1. cast and ImageNet normalisation;
2. every clip's crop resized back to the frame's size in one bilinear ``grid_sample``, sampling where
   ``F.interpolate(align_corners=False)`` samples when it resizes the crop (half-pixel centres, clamped to the
   box's edge pixels, no antialiasing): equal to it within the float32 rounding of those positions
   (tests/test_video_batch.py states the tolerance);
3. every flip in one ``gather`` (exact);
4. every erasing box in one ``torch.where``.

What no clip of a batch needs is skipped, decided on the host from the geometry (a host tensor: reading it costs
no device sync): evaluation batches are only cast and normalised, pre-training's are neither flipped nor erased.

Erasing noise is per-pixel N(0, 1), fresh for every frame and channel, drawn in one call for the whole batch from
one generator on the device, seeded with a hash of the batch's noise seeds (``batch_noise``). So a batch's noise
is a function of its clips, and a resumed run draws it again exactly (batches are functions of the seed, epoch and
rank); a clip's noise depends on the batch it is in, not on its own seed alone.

``device_batch`` moves a whole loader batch that way; every path from a loader to the model goes through it
(training, evaluation, prediction, the benchmarks), and a model handed the uint8 video would fail at once.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from model.constants import IMAGENET_MEAN, IMAGENET_STD

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels

VIDEO, GEOMETRY = "video", "video_geometry"
CROP, FLIP, ERASE, NOISE_SEED = slice(0, 4), 4, slice(5, 9), 9  # the columns of a geometry row


class Geometry(NamedTuple):
    """What the device does to one clip's normalised frames, in this order: resize ``crop`` back to the frame's
    size, ``flip`` left-right, fill ``erase`` (height 0: nothing) with N(0, 1) noise (``batch_noise``)."""

    crop: Box
    flip: bool
    erase: Box
    noise_seed: int

    def row(self) -> np.ndarray:
        """(10,) int64: how an example carries it (one small array a batch, not four)."""
        return np.array([*self.crop, self.flip, *self.erase, self.noise_seed], dtype=np.int64)

    @classmethod
    def from_row(cls, row: list[int]) -> Geometry:
        return cls(tuple(row[CROP]), bool(row[FLIP]), tuple(row[ERASE]), row[NOISE_SEED])


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


def to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A small host array on ``device`` without waiting for the device (a copy from pageable memory is staged)."""
    return torch.from_numpy(array).to(device, non_blocking=True)


def normalize(video: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float32: v / 255, then ImageNet mean/std per channel."""
    mean = to_device(np.array(IMAGENET_MEAN, dtype=np.float32).reshape(1, 3, 1, 1, 1), video.device)
    std = to_device(np.array(IMAGENET_STD, dtype=np.float32).reshape(1, 3, 1, 1, 1), video.device)
    return video.permute(0, 4, 1, 2, 3).contiguous().float().div_(255.0).sub_(mean).div_(std)


def source_positions(start: np.ndarray, length: np.ndarray, size: int) -> np.ndarray:
    """(B,) box starts and lengths along one axis -> (B, size) float64: the pixel positions of the frame that
    resizing each box to ``size`` samples bilinearly, as ``F.interpolate(align_corners=False)`` on the box:
    half-pixel centres, clamped to the box's first and last pixel."""
    inside = (np.arange(size) + 0.5) * (length[:, None] / size) - 0.5
    return start[:, None] + np.clip(inside, 0, length[:, None] - 1)


def resize_grid(crops: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, 4) crop boxes -> (B, W + H) float32: where each clip's output pixels sample its frames, in
    ``grid_sample``'s coordinates (-1 and 1 the outer edges of the frame): x of the W columns, then y of the H rows."""
    top, left, h, w = crops.T
    x, y = source_positions(left, w, width), source_positions(top, h, height)
    return np.concatenate([(2 * x + 1) / width - 1, (2 * y + 1) / height - 1], axis=1).astype(np.float32)


def resized_crops(video: torch.Tensor, crops: np.ndarray) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C, T, H, W): every clip's (B, 4) crop box resized to the frame's size, in one bilinear
    ``grid_sample`` (a clip's frames and channels share its grid)."""
    b, c, t, h, w = video.shape
    xy = to_device(resize_grid(crops, h, w), video.device)  # (B, W + H): one copy
    x, y = xy[:, None, :w].expand(b, h, w), xy[:, w:, None].expand(b, h, w)
    grid = torch.stack([x, y], dim=-1)  # (B, H, W, 2)
    frames = F.grid_sample(video.view(b, c * t, h, w), grid, mode="bilinear", padding_mode="border",
                           align_corners=False)  # (B, C * T, H, W)
    return frames.view(b, c, t, h, w)


def flipped(video: torch.Tensor, flips: np.ndarray) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C, T, H, W): the clips of the (B,) ``flips`` mirrored left-right, in one gather
    (every clip reads its columns in its own order)."""
    b, w = video.shape[0], video.shape[-1]
    columns = np.where(flips[:, None] != 0, np.arange(w)[::-1], np.arange(w))  # (B, W)
    index = to_device(columns.reshape(b, 1, 1, 1, w), video.device)
    return video.gather(-1, index.expand_as(video))


def erase_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, 4) erasing boxes -> (B, 1, 1, H, W) bool: the pixels each box covers, alike in every channel and frame."""
    top, left, h, w = boxes.T[:, :, None, None]  # each (B, 1, 1)
    rows, cols = np.arange(height)[:, None], np.arange(width)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, H, W)
    return inside[:, None, None]


def batch_noise(noise_seeds: np.ndarray, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """Per-pixel N(0, 1) float32 noise of ``shape`` on ``device``, from one generator seeded with a hash of the
    batch's (B,) ``noise_seeds``: the same seeds in the same order, the same noise."""
    digest = hashlib.sha256(np.ascontiguousarray(noise_seeds, dtype="<i8").tobytes()).digest()
    generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randn(shape, generator=generator, device=device)


def erased(video: torch.Tensor, boxes: np.ndarray, noise_seeds: np.ndarray) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C, T, H, W): every clip's (B, 4) erasing box, the same in every frame, filled with
    the batch's noise (``batch_noise``); a box of height 0 erases nothing."""
    inside = to_device(erase_mask(boxes, *video.shape[-2:]), video.device)  # (B, 1, 1, H, W)
    return torch.where(inside, batch_noise(noise_seeds, video.shape, video.device), video)


def video_to_model(batch: dict, device: torch.device | str) -> torch.Tensor:
    """A loader batch's video as the model takes it, on ``device``: ``video`` (B, T, H, W, 3) uint8 with its
    ``video_geometry`` (B, 10) (a host tensor, so reading it costs no device sync) -> (B, 3, T, H, W) float32."""
    geometry = batch[GEOMETRY].numpy()
    video = normalize(batch[VIDEO].to(device, non_blocking=True))
    crops, flips, erasing = geometry[:, CROP], geometry[:, FLIP], geometry[:, ERASE]
    if (crops != (0, 0, *video.shape[-2:])).any():
        video = resized_crops(video, crops)
    if flips.any():
        video = flipped(video, flips)
    if erasing[:, 2].any():
        video = erased(video, erasing, geometry[:, NOISE_SEED])
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
