"""The configuration schema, part two: the training sections of ``params.yaml`` (model, window, optimiser,
scaling, pre-training, fine-tuning), checked against the model library's sizes and fields.

    params = training_params(load_params("params.yaml"))
    settings = finetune_settings_for(params, load_dataset_config("crema-d"))   # with the dataset's overrides

The defaults are the paper's settings (HiCMAE-B, the reference's optimiser, schedule and augmentation).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from model import ARCHITECTURE_FIELDS, SIZES, HiCMAEConfig, get_config

from .augment import AugmentConfig
from .params import DataParams, DatasetConfig, Strict, set_dotted, validate


class ModelSettings(Strict):
    size: str = "hicmae_base"
    overrides: dict[str, Any] = Field(default_factory=dict, description="any HiCMAEConfig field")

    @field_validator("size")
    @classmethod
    def _known_size(cls, size: str) -> str:
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
        return size

    @field_validator("overrides")
    @classmethod
    def _known_fields(cls, overrides: dict) -> dict:
        unknown = sorted(set(overrides) - set(ARCHITECTURE_FIELDS))
        if unknown:
            raise ValueError(f"unknown model field(s): {', '.join(unknown)}")
        return overrides

    def build_config(self, **extra) -> HiCMAEConfig:
        return get_config(self.size, **{**self.overrides, **extra})


class WindowSettings(Strict):
    """How a training window is cut from a clip (the reference: 16 frames, every 4th, 256 fbank frames)."""

    num_frames: int = Field(16, ge=2)
    sampling_rate: int = Field(4, ge=1)
    audio_frames: int = Field(256, ge=16)

    @property
    def span(self) -> int:
        """Clip frames a window covers (64 = 2.56 s at 25 fps)."""
        return self.num_frames * self.sampling_rate


class OptimSettings(Strict):
    """AdamW with linear warm-up then per-step cosine decay; lr and min_lr are scaled by total batch / 256."""

    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = Field(1.0, gt=0, le=1, description="layer-wise lr decay; 1 = off")
    clip_grad: float | None = Field(None, gt=0)
    max_skipped_steps: int = Field(20, ge=1, description="a step whose loss or gradient norm is not finite is skipped "
                                   "(not applied, counted as train/skipped_steps); this many in a row stop the run")


class PretrainSettings(Strict):
    dataset: str = "demo"
    model: ModelSettings = Field(default_factory=ModelSettings)
    window: WindowSettings = Field(default_factory=WindowSettings)
    optim: OptimSettings = Field(default_factory=lambda: OptimSettings(lr=3e-4, min_lr=1e-5, betas=(0.9, 0.95)))
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(40, ge=1, description="per worker")
    shuffle_buffer: int = Field(256, ge=0, description="clips each loader worker mixes, still packed (JPEG)")
    init: str = Field("none", description="'none', or the weights to go on from: an exported pre-training folder "
                      "(e.g. a copy of runs/pretrain/model), a Hugging Face Hub repo id (org/name[@revision]) or a "
                      "checkpoint file")
    seed: int = 0


class FinetuneSettings(Strict):
    model: ModelSettings = Field(default_factory=ModelSettings)
    init: str = Field("pretrain", description="'pretrain' (this pipeline's checkpoint), 'none', an exported folder "
                      "(e.g. runs/pretrain/model), a Hugging Face Hub repo id (org/name[@revision]) or a file path")
    window: WindowSettings = Field(default_factory=WindowSettings)
    optim: OptimSettings = Field(default_factory=lambda: OptimSettings(layer_decay=0.75))
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(14, ge=1, description="per worker")
    drop_path: float = Field(0.1, ge=0, lt=1)
    protocol: Literal["clean", "reference"] = "clean"
    val_fraction: float = Field(0.1, ge=0, lt=1, description="training-fold speakers held out (clean protocol)")
    folds: list[int] = Field(default_factory=list, description="test folds to run; empty = all")
    test_views: int = Field(2, ge=1, description="temporal views averaged per clip at test time")
    seed: int = 0


class Params(DataParams):
    """Everything ``params.yaml`` holds, the training sections checked too."""

    pretrain: PretrainSettings = Field(default_factory=PretrainSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)


def training_params(params: DataParams) -> Params:
    """``params`` with its training sections checked (a ConfigError naming the file and key otherwise)."""
    if isinstance(params, Params):
        return params
    checked = validate(Params, params.model_dump(exclude_unset=True), params._source)
    checked._source = params._source
    return checked


def finetune_settings_for(params: Params, dataset: DatasetConfig) -> FinetuneSettings:
    """The finetune section with the dataset's overrides applied (validated again)."""
    tree = params.finetune.model_dump(mode="json")
    for key, value in dataset.finetune.items():
        set_dotted(tree, key, value)
    return validate(FinetuneSettings, tree, f"{dataset._source}: finetune")
