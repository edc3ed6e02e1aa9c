"""RandAugment on clips: the op tables, drawing one clip's ops, and applying them identically to every frame.

The reference's ``rand-m7-n4-mstd0.5-inc1``: 4 ops drawn with replacement, each applied with p=0.5, magnitude
N(7, 0.5) clipped to [0, 10], bicubic resampling, grey fill (128, 128, 128), with timm's level-to-argument
mappings.

Each op maps a (T, H, W, 3) uint8 clip and one argument, drawn once per clip, to a new clip. The enhancers
(colour, contrast, brightness, sharpness) equal PIL's value for value on the whole clip (``enhance.py``). Value
maps are lookup tables identical
to PIL's: one for the whole clip (invert, posterize, solarize) or one per frame and channel from its histogram
(auto-contrast, equalise). Geometric ops reproduce PIL's affine geometry with OpenCV (several times faster than
PIL's bicubic transform): same sampling positions, edge-clamped neighbours, grey fill where the source point lies
outside the frame; only the cubic kernel differs (OpenCV a=-0.75), which moves pixel values by about one level on
smooth images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ...config.augment import MAX_LEVEL, AugmentConfig
from .enhance import brightness_clip, color_clip, contrast_clip, sharpness_clip

FILL_COLOR = (128, 128, 128)  # the reference passes no image mean to RandAugment, so the default grey is used

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
    grey, outside = np.full((height, width, 3), FILL_COLOR, np.uint8), outside.astype(np.uint8)
    out = np.empty_like(frames)
    for t, frame in enumerate(frames):
        cv2.warpAffine(frame, matrix, (width, height), dst=out[t], flags=flags, borderMode=cv2.BORDER_REPLICATE)
        cv2.copyTo(grey, outside, out[t])  # fill where the source point is outside (numpy's masked write: 30x slower)
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
_ENHANCERS = {"Color": color_clip, "Contrast": contrast_clip, "Brightness": brightness_clip,
              "Sharpness": sharpness_clip}  # each takes the factor's difference from 1

# Severity grows with the level: fewer bits kept, lower solarize threshold, enhancement factor further from 1.
INCREASING_OPS = {
    **_COMMON_OPS,
    "PosterizeIncreasing": _OpDef(_lookup(posterize_table), lambda lv, cfg: 4 - int(_fraction(lv) * 4)),
    "SolarizeIncreasing": _OpDef(_lookup(solarize_table), lambda lv, cfg: 256 - int(_fraction(lv) * 256)),
    **{f"{name}Increasing": _OpDef(enhance, lambda lv, cfg: _fraction(lv) * 0.9, signed=True)
       for name, enhance in _ENHANCERS.items()},
}
# The original RandAugment mappings: enhancement factor 0.1 .. 1.9 (no sign), posterize/solarize milder with level.
ORIGINAL_OPS = {
    **_COMMON_OPS,
    "Posterize": _OpDef(_lookup(posterize_table), lambda lv, cfg: int(_fraction(lv) * 4)),
    "Solarize": _OpDef(_lookup(solarize_table), lambda lv, cfg: int(_fraction(lv) * 256)),
    **{name: _OpDef(enhance, lambda lv, cfg: _fraction(lv) * 1.8 + 0.1 - 1.0)
       for name, enhance in _ENHANCERS.items()},
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
