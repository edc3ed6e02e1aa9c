"""Fine-tuning augmentation of the reference (HiCMAE section 5.4), re-implemented with numpy, OpenCV, PIL, torch.

Per clip (every frame of a window shares the same random parameters):

1. resize every frame to ``input_size`` x ``input_size`` (PIL bilinear, aspect not kept);
2. RandAugment ``rand-m7-n4-mstd0.5-inc1`` (4 ops drawn with replacement, each applied with p=0.5, magnitude
   N(7, 0.5) clipped to [0, 10], bicubic resampling, grey fill (128, 128, 128)) with timm's level-to-argument
   mappings; value ops equal PIL's exactly, geometric ops follow PIL's geometry (see the section below);
3. to float in [0, 1], ImageNet mean/std normalisation, layout (3, T, H, W);
4. random resized crop (scale 0.08-1, log-uniform ratio 0.75-1.3333, 10 tries then centre fallback), bilinear;
5. horizontal flip p=0.5;
6. random erasing p=0.25: one box (area 2%-1/3, log-uniform aspect 0.3-3.33) at the same place in every frame,
   filled with per-pixel N(0, 1) noise drawn afresh for every frame (the reference's cube mode shares the box,
   not the noise).

Per batch: Mixup (alpha 0.8) or CutMix (alpha 1.0), switch probability 0.5, with the reversed batch as partner,
and label smoothing 0.1. The reference mixes only the video while it mixes the labels; ``mix_audio=True`` also
mixes the audio (same lambda for Mixup; for CutMix a contiguous time span of the partner's log-mel, covering the
same fraction of time as the video box covers of the frame).

All randomness comes from the ``np.random.Generator`` passed in, so a seed reproduces a clip exactly. Do not call
``cv2.setNumThreads`` inside forked data-loader workers: after a fork, resizing OpenCV's thread pool can hang.
The reference's waveform ``roll_mag_aug`` is deliberately not reproduced.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.constants import IMAGENET_MEAN, IMAGENET_STD

MAX_LEVEL = 10.0
FILL_COLOR = (128, 128, 128)  # the reference passes no image mean to RandAugment, so the default grey is used


class AugmentConfig(BaseModel):
    """Every knob of the fine-tuning augmentation; the defaults are the reference's classification recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int = Field(160, gt=0, description="output side; frames are first resized to this square")

    rand_augment: bool = True
    num_ops: int = Field(4, ge=0, description="RandAugment ops drawn (with replacement) per clip")
    magnitude: float = Field(7.0, ge=0, le=MAX_LEVEL)
    magnitude_std: float = Field(0.5, ge=0, description="Gaussian noise on the magnitude, drawn per op")
    op_prob: float = Field(0.5, ge=0, le=1, description="probability that a drawn op is applied")
    increasing: bool = Field(True, description="'inc1' op set: severity grows with the magnitude")
    translate_pct: float = Field(0.45, ge=0, description="TranslateXRel/YRel at magnitude 10, fraction of the side")

    random_resized_crop: bool = True
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (0.75, 1.3333)

    flip: bool = True
    flip_prob: float = Field(0.5, ge=0, le=1)

    random_erase: bool = True
    erase_prob: float = Field(0.25, ge=0, le=1)
    erase_area: tuple[float, float] = (0.02, 1 / 3)
    erase_aspect: tuple[float, float] = (0.3, 1 / 0.3)

    mixup: bool = Field(True, description="batch-level Mixup/CutMix (and their soft targets)")
    mixup_alpha: float = Field(0.8, ge=0)
    cutmix_alpha: float = Field(1.0, ge=0)
    mix_prob: float = Field(1.0, ge=0, le=1)
    switch_prob: float = Field(0.5, ge=0, le=1, description="probability of CutMix when both are active")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mix_audio: bool = Field(False, description="also mix the audio (the reference mixes only the video)")

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> AugmentConfig:
        for name in ("rrc_scale", "rrc_ratio", "erase_area", "erase_aspect"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(low, high)}")
        return self

    @classmethod
    def from_rand_augment(cls, spec: str, **fields: Any) -> AugmentConfig:
        """Build a config from a timm-style string such as 'rand-m7-n4-mstd0.5-inc1' plus other fields."""
        return cls(**parse_rand_augment(spec), **fields)


def parse_rand_augment(spec: str) -> dict[str, Any]:
    """'rand-m7-n4-mstd0.5-inc1' -> {magnitude: 7.0, num_ops: 4, magnitude_std: 0.5, increasing: True}."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"a RandAugment spec starts with 'rand', got {spec!r}")
    keys = {"m": ("magnitude", float), "n": ("num_ops", int), "mstd": ("magnitude_std", float),
            "inc": ("increasing", lambda v: bool(int(v)))}
    fields: dict[str, Any] = {"increasing": False}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if match is None or match.group(1) not in keys:
            raise ValueError(f"unknown RandAugment option {part!r} in {spec!r}")
        name, convert = keys[match.group(1)]
        fields[name] = convert(match.group(2))
    return fields


# ----------------------------------------------------------------------------------------------------------------
# RandAugment ops. Each maps a (T, H, W, 3) uint8 clip and one argument, drawn once per clip, to a new clip.
# The enhancers (colour, contrast, brightness, sharpness) run through PIL frame by frame. Value maps are lookup
# tables identical to PIL's: one for the whole clip (invert, posterize, solarize) or one per frame and channel from
# its histogram (auto-contrast, equalise).
# Geometric ops reproduce PIL's affine geometry with OpenCV (several times faster than PIL's bicubic transform):
# same sampling positions, edge-clamped neighbours, grey fill where the source point lies outside the frame;
# only the cubic kernel differs (OpenCV a=-0.75), which moves pixel values by about one level on smooth images.


def _per_frame(op: Callable[[Image.Image, Any], Image.Image]) -> Callable[[np.ndarray, Any], np.ndarray]:
    """Lift a PIL op (image, arg) -> image to a clip op applied to every frame."""
    def apply(frames: np.ndarray, arg: Any) -> np.ndarray:
        out = np.empty_like(frames)
        for t, frame in enumerate(frames):
            out[t] = np.asarray(op(Image.fromarray(frame), arg))
        return out
    return apply


def _lookup(make_table: Callable[[Any], np.ndarray]) -> Callable[[np.ndarray, Any], np.ndarray]:
    """A clip op that maps every value v to make_table(arg)[v] (a 256-entry uint8 table)."""
    return lambda frames, arg: _apply_table(frames, make_table(arg))


def _apply_table(frames: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> same shape: every value v replaced by table[v] (a (256,) uint8 table)."""
    t, h, w, _ = frames.shape
    return cv2.LUT(frames.reshape(t * h, w, 3), table).reshape(t, h, w, 3)


_VALUES = np.arange(256)


def invert_table(_: Any = None) -> np.ndarray:
    return (255 - _VALUES).astype(np.uint8)


def posterize_table(bits: int) -> np.ndarray:
    """Keep the ``bits`` most significant bits (8 or more: identity)."""
    mask = 255 if bits >= 8 else (0xFF << (8 - bits)) & 0xFF
    return (_VALUES & mask).astype(np.uint8)


def solarize_table(threshold: int) -> np.ndarray:
    """Invert every value >= threshold."""
    return np.where(_VALUES < threshold, _VALUES, 255 - _VALUES).astype(np.uint8)


def solarize_add_table(add: int) -> np.ndarray:
    """Add ``add`` (saturating at 255) to every value below 128."""
    return np.where(_VALUES < 128, np.minimum(_VALUES + add, 255), _VALUES).astype(np.uint8)


def channel_histograms(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 3, 256) int64: the value counts of every frame and channel."""
    return np.array([[cv2.calcHist([frame], [channel], None, [256], [0, 256]).ravel() for channel in range(3)]
                     for frame in frames]).astype(np.int64)


def _apply_frame_tables(frames: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 with (T, 3, 256) uint8 tables -> every value v of frame t, channel c is tables[t, c, v]."""
    out = np.empty_like(frames)
    for t, frame in enumerate(frames):
        cv2.LUT(frame, np.ascontiguousarray(tables[t].T).reshape(1, 256, 3), dst=out[t])
    return out


def autocontrast_tables(histograms: np.ndarray) -> np.ndarray:
    """(..., 256) counts -> (..., 256) uint8 tables of PIL's ``ImageOps.autocontrast`` (no cutoff): stretch the
    occupied range [lo, hi] to [0, 255], truncating; identity where a channel holds one value."""
    occupied = histograms > 0
    lo = np.argmax(occupied, axis=-1)[..., None].astype(np.float64)
    hi = 255 - np.argmax(occupied[..., ::-1], axis=-1)[..., None].astype(np.float64)
    stretch = hi > lo
    scale = 255.0 / np.where(stretch, hi - lo, 1.0)
    values = np.arange(256, dtype=np.float64)
    stretched = np.clip(np.trunc(values * scale + -lo * scale), 0, 255)
    return np.where(stretch, stretched, values).astype(np.uint8)


def equalize_tables(histograms: np.ndarray) -> np.ndarray:
    """(..., 256) counts -> (..., 256) uint8 tables of PIL's ``ImageOps.equalize``: cumulative counts divided by
    step = (pixels - count of the highest occupied value) // 255; identity for a single value or step 0."""
    occupied = histograms > 0
    highest = 255 - np.argmax(occupied[..., ::-1], axis=-1)[..., None]
    last_count = np.take_along_axis(histograms, highest, axis=-1)
    step = (histograms.sum(axis=-1, keepdims=True) - last_count) // 255
    equalize = (occupied.sum(axis=-1, keepdims=True) > 1) & (step > 0)
    safe_step = np.where(equalize, step, 1)
    before = np.cumsum(histograms, axis=-1) - histograms  # pixels below each value
    equalized = np.minimum((safe_step // 2 + before) // safe_step, 255)
    return np.where(equalize, equalized, np.arange(256)).astype(np.uint8)


def autocontrast_clip(frames: np.ndarray, _: Any = None) -> np.ndarray:
    """PIL ``ImageOps.autocontrast`` of every frame, each with its own per-channel range."""
    return _apply_frame_tables(frames, autocontrast_tables(channel_histograms(frames)))


def equalize_clip(frames: np.ndarray, _: Any = None) -> np.ndarray:
    """PIL ``ImageOps.equalize`` of every frame, each with its own per-channel histogram."""
    return _apply_frame_tables(frames, equalize_tables(channel_histograms(frames)))


def _enhancer(kind: type) -> Callable[[Image.Image, float], Image.Image]:
    """A PIL op that blends with the enhancer's degenerate image by factor 1 + delta."""
    return lambda img, delta: kind(img).enhance(1.0 + delta)


def affine_clip(frames: np.ndarray, coefficients: tuple[float, ...]) -> np.ndarray:
    """(T, H, W, 3) uint8 -> same shape: PIL-convention affine warp of every frame, bicubic, grey fill.

    ``coefficients`` (a, b, c, d, e, f) map an output point (x, y) to the input point (a x + b y + c,
    d x + e y + f) in PIL's continuous coordinates (pixel i spans [i, i + 1))."""
    a, b, c, d, e, f = coefficients
    height, width = frames.shape[1:3]
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    src_x, src_y = a * xs + b * ys + c, d * xs + e * ys + f
    outside = (src_x < 0) | (src_x >= width) | (src_y < 0) | (src_y >= height)
    matrix = np.array([[a, b, c + 0.5 * (a + b) - 0.5], [d, e, f + 0.5 * (d + e) - 0.5]])  # pixel-centre coords
    flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
    out = np.empty_like(frames)
    for t, frame in enumerate(frames):
        out[t] = cv2.warpAffine(frame, matrix, (width, height), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    out[:, outside] = FILL_COLOR
    return out


def rotation_coefficients(degrees: float, width: int, height: int) -> tuple[float, ...]:
    """PIL ``Image.rotate`` coefficients: counter-clockwise by ``degrees`` about the frame centre."""
    angle = -math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = width / 2.0, height / 2.0
    return (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def _rotate(frames: np.ndarray, degrees: float) -> np.ndarray:
    return affine_clip(frames, rotation_coefficients(degrees, frames.shape[2], frames.shape[1]))


def _shear_x(frames: np.ndarray, factor: float) -> np.ndarray:
    return affine_clip(frames, (1, factor, 0, 0, 1, 0))


def _shear_y(frames: np.ndarray, factor: float) -> np.ndarray:
    return affine_clip(frames, (1, 0, 0, factor, 1, 0))


def _translate_x_rel(frames: np.ndarray, fraction: float) -> np.ndarray:
    return affine_clip(frames, (1, 0, fraction * frames.shape[2], 0, 1, 0))


def _translate_y_rel(frames: np.ndarray, fraction: float) -> np.ndarray:
    return affine_clip(frames, (1, 0, 0, 0, 1, fraction * frames.shape[1]))


@dataclass(frozen=True)
class _OpDef:
    """One RandAugment op: ``apply(frames, arg)``; ``level_to_arg(level, cfg)`` maps a level in [0, 10] to arg;
    ``signed`` ops get their argument negated with probability 1/2."""

    apply: Callable[[np.ndarray, Any], np.ndarray]
    level_to_arg: Callable[[float, AugmentConfig], Any] | None = None
    signed: bool = False


def _fraction(level: float) -> float:
    return level / MAX_LEVEL


_COMMON_OPS = {
    "AutoContrast": _OpDef(autocontrast_clip),
    "Equalize": _OpDef(equalize_clip),
    "Invert": _OpDef(_lookup(invert_table)),
    "Rotate": _OpDef(_rotate, lambda lv, cfg: _fraction(lv) * 30.0, signed=True),
    "SolarizeAdd": _OpDef(_lookup(solarize_add_table), lambda lv, cfg: int(_fraction(lv) * 110)),
    "ShearX": _OpDef(_shear_x, lambda lv, cfg: _fraction(lv) * 0.3, signed=True),
    "ShearY": _OpDef(_shear_y, lambda lv, cfg: _fraction(lv) * 0.3, signed=True),
    "TranslateXRel": _OpDef(_translate_x_rel, lambda lv, cfg: _fraction(lv) * cfg.translate_pct, signed=True),
    "TranslateYRel": _OpDef(_translate_y_rel, lambda lv, cfg: _fraction(lv) * cfg.translate_pct, signed=True),
}
_ENHANCERS = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
              "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}

# Severity grows with the level: fewer bits kept, lower solarize threshold, enhancement factor further from 1.
INCREASING_OPS = {
    **_COMMON_OPS,
    "PosterizeIncreasing": _OpDef(_lookup(posterize_table), lambda lv, cfg: 4 - int(_fraction(lv) * 4)),
    "SolarizeIncreasing": _OpDef(_lookup(solarize_table), lambda lv, cfg: 256 - int(_fraction(lv) * 256)),
    **{f"{name}Increasing": _OpDef(_per_frame(_enhancer(kind)), lambda lv, cfg: _fraction(lv) * 0.9, signed=True)
       for name, kind in _ENHANCERS.items()},
}
# The original RandAugment mappings: enhancement factor 0.1 .. 1.9 (no sign), posterize/solarize milder with level.
ORIGINAL_OPS = {
    **_COMMON_OPS,
    "Posterize": _OpDef(_lookup(posterize_table), lambda lv, cfg: int(_fraction(lv) * 4)),
    "Solarize": _OpDef(_lookup(solarize_table), lambda lv, cfg: int(_fraction(lv) * 256)),
    **{name: _OpDef(_per_frame(_enhancer(kind)), lambda lv, cfg: _fraction(lv) * 1.8 + 0.1 - 1.0)
       for name, kind in _ENHANCERS.items()},
}


@dataclass(frozen=True)
class RandAugmentOp:
    """An op drawn for one clip: its name and the argument every frame of the clip receives."""

    name: str
    arg: Any


def _op_table(increasing: bool) -> dict[str, _OpDef]:
    return INCREASING_OPS if increasing else ORIGINAL_OPS


def sample_rand_augment(rng: np.random.Generator, cfg: AugmentConfig) -> list[RandAugmentOp]:
    """Draw the ops of one clip: ``num_ops`` names with replacement, each kept with ``op_prob``, its magnitude
    drawn from N(magnitude, magnitude_std) clipped to [0, 10], and a random sign for signed ops."""
    table = _op_table(cfg.increasing)
    names = list(table)
    chosen = [names[i] for i in rng.integers(0, len(names), size=cfg.num_ops)]
    ops = []
    for name in chosen:
        if rng.random() > cfg.op_prob:
            continue
        definition = table[name]
        level = cfg.magnitude
        if cfg.magnitude_std > 0:
            level = rng.normal(level, cfg.magnitude_std)
        level = min(MAX_LEVEL, max(0.0, level))
        arg = definition.level_to_arg(level, cfg) if definition.level_to_arg else None
        if definition.signed and rng.random() > 0.5:
            arg = -arg
        ops.append(RandAugmentOp(name, arg))
    return ops


def apply_rand_augment(frames: np.ndarray, ops: list[RandAugmentOp], increasing: bool = True) -> np.ndarray:
    """(T, H, W, 3) uint8 -> same shape: apply the drawn ops in order, identically to every frame."""
    table = _op_table(increasing)
    for op in ops:
        frames = table[op.name].apply(frames, op.arg)
    return frames


# ----------------------------------------------------------------------------------------------------------------
# Clip-level steps.


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


# ----------------------------------------------------------------------------------------------------------------
# Batch-level Mixup / CutMix and the criteria.


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


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k target_k log softmax(logits)_k; logits and soft_targets (B, K)."""
    return torch.sum(-soft_targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def label_smoothing_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                  smoothing: float = 0.1) -> torch.Tensor:
    """Mean over the batch of (1 - s) * NLL(target) + s * mean_k(-log p_k); logits (B, K), targets (B,) int."""
    log_probs = F.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(dim=-1, index=targets.long().unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=-1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()


if __name__ == "__main__":
    import time

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    generator = np.random.default_rng(0)
    clip = generator.integers(0, 256, size=(16, 160, 160, 3), dtype=np.uint8)
    config = AugmentConfig()
    train_video_transform(clip, generator, config)
    count, cpu_start, wall_start = 300, time.process_time(), time.perf_counter()
    for _ in range(count):
        train_video_transform(clip, generator, config)
    cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
    print(f"train_video_transform, 16 x 160 x 160, one thread: {count / cpu:.0f} clips per CPU second, "
          f"{count / wall:.0f} clips/s wall")
