"""Every knob of the fine-tuning augmentation, and the timm-style RandAugment spec string they come from."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_LEVEL = 10.0  # RandAugment magnitudes live in [0, MAX_LEVEL]


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
