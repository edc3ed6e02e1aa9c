"""The configuration schema: pydantic models are the schema, ``params.yaml`` and ``conf/`` hold the values.

    params = load_params("params.yaml", overrides=["finetune.epochs=3"])
    params.finetune.optim.lr

Unknown keys and invalid values fail at load with the dotted key named. ``dvc exp run -S key=value`` edits
``params.yaml``; the CLI's ``--set key=value`` applies overrides on top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from model import ARCHITECTURE_FIELDS, SIZES, HiCMAEConfig, get_config
from preprocessing.errors import InputError
from preprocessing.settings import PreprocessSettings

from .augment import AugmentConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(InputError, ValueError):
    """A parameter file or value the user must fix, as one line: ``<file>: <key>: <problem>``."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class ScalingSettings(Strict):
    """Ray Train workers. Fractional CPUs leave room for Ray Data on small machines."""

    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    max_failures: int = Field(2, ge=0, description="restarts from the last checkpoint after a worker dies")


class PretrainSettings(Strict):
    dataset: str = "demo"
    model: ModelSettings = Field(default_factory=ModelSettings)
    window: WindowSettings = Field(default_factory=WindowSettings)
    optim: OptimSettings = Field(default_factory=lambda: OptimSettings(lr=3e-4, min_lr=1e-5, betas=(0.9, 0.95)))
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(40, ge=1, description="per worker")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    seed: int = 0


class FinetuneSettings(Strict):
    model: ModelSettings = Field(default_factory=ModelSettings)
    init: str = Field("pretrain", description="'pretrain' (this pipeline's checkpoint), 'none', or a file path")
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


class DatasetEntry(Strict):
    root: str = Field(description="the dataset folder as distributed; relative paths are from the project root")

    def root_path(self) -> Path:
        path = Path(self.root).expanduser()
        return path if path.is_absolute() else PROJECT_ROOT / path


class DemoSettings(Strict):
    seed: int = 0
    speakers: int = Field(10, ge=2)
    clips_per_speaker: int = Field(10, ge=1)


class Params(Strict):
    """Everything ``params.yaml`` holds."""

    anchors: dict[str, Any] = Field(default_factory=dict,
                                    description="YAML anchors that several sections share; not read directly")
    demo: DemoSettings = Field(default_factory=DemoSettings)
    datasets: dict[str, DatasetEntry] = Field(default_factory=lambda: {"demo": DatasetEntry(root="data/demo/raw")})
    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings)
    pretrain: PretrainSettings = Field(default_factory=PretrainSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    experiment: str = "hicmae"
    variant: str = Field("baseline", min_length=1,
                         description="this configuration's name, tagged on every MLflow run (ablations set it)")
    _source: str = PrivateAttr("params.yaml")  # the file these values were read from, for error messages

    def dataset_root(self, dataset: str) -> Path:
        """The folder of a dataset listed under ``datasets``; a ConfigError for one that is not listed."""
        if dataset not in self.datasets:
            raise ConfigError(f"{self._source}: datasets: no dataset {dataset!r}; listed: {', '.join(self.datasets)}")
        return self.datasets[dataset].root_path()


class DatasetConfig(Strict):
    """``conf/datasets/<name>.yaml``: which adapter reads a dataset and how its training differs from the defaults.

    (Where the dataset lives is in ``params.yaml`` under ``datasets``, so DVC can track the folder.)
    """

    adapter: str
    finetune: dict[str, Any] = Field(default_factory=dict, description="overrides of params' finetune section")
    _source: str = PrivateAttr("conf/datasets/<name>.yaml")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise ValueError(f"{key} is not a section")
    tree[leaf] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """``["a.b=3", "c=[1, 2]"]`` -> values parsed as YAML and set in a copy of ``tree``."""
    tree = yaml.safe_load(yaml.safe_dump(tree))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: not key=value")
        key, text = item.split("=", 1)
        try:
            _set_dotted(tree, key.strip(), yaml.safe_load(text))
        except (ValueError, yaml.YAMLError) as err:
            raise ConfigError(f"--set {item}: {' '.join(str(err).split())}") from None
    return tree


def _validate(schema: type[BaseModel], tree: dict, source: str) -> BaseModel:
    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{source}: {problems}") from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return tree


def load_params(path: str | Path = PROJECT_ROOT / "params.yaml", overrides: list[str] = ()) -> Params:
    params = _validate(Params, apply_overrides(read_yaml(path), list(overrides)), str(path))
    params._source = str(path)
    return params


def load_dataset_config(name: str, conf_dir: str | Path = PROJECT_ROOT / "conf" / "datasets") -> DatasetConfig:
    path = Path(conf_dir) / f"{name}.yaml"
    config = _validate(DatasetConfig, read_yaml(path), str(path))
    config._source = str(path)
    return config


def finetune_settings_for(params: Params, dataset: DatasetConfig) -> FinetuneSettings:
    """The finetune section with the dataset's overrides applied (validated again)."""
    tree = params.finetune.model_dump(mode="json")
    for key, value in dataset.finetune.items():
        _set_dotted(tree, key, value)
    return _validate(FinetuneSettings, tree, f"{dataset._source}: finetune")
