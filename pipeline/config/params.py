"""The configuration schema, part one: reading ``params.yaml`` and ``conf/``, ``--set`` overrides, one-line errors,
and the sections every stage reads. Pydantic models are the schema, the YAML files hold the values.

    params = load_params("params.yaml", overrides=["finetune.epochs=3"])   # DataParams
    params = training_params(params)                                       # pipeline.config.training.Params
    params.finetune.optim.lr

Unknown keys and invalid values fail at load with the file and the dotted key named. ``dvc exp run -S key=value``
edits ``params.yaml``; the CLI's ``--set key=value`` applies overrides on top. The training sections (model,
optimiser, pre-training, fine-tuning, scaling) are checked by ``pipeline.config.training``, which imports the model
library: the data stages, which do not train, load ``DataParams`` and so do not depend on the model's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from preprocessing.errors import InputError
from preprocessing.settings import EXECUTION_FIELDS, PreprocessSettings

from ..layout import PROJECT_ROOT


class ConfigError(InputError, ValueError):
    """A parameter file or value the user must fix, as one line: ``<file>: <key>: <problem>``."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetEntry(Strict):
    root: str = Field(description="the dataset folder as distributed; relative paths are from the project root")

    def root_path(self) -> Path:
        path = Path(self.root).expanduser()
        return path if path.is_absolute() else PROJECT_ROOT / path


class DemoSettings(Strict):
    seed: int = 0
    speakers: int = Field(10, ge=2)
    clips_per_speaker: int = Field(10, ge=1)


class ScalingSettings(Strict):
    """How the stages run on the Ray cluster: the Ray Train workers of each training run, their CPUs, loader
    processes and retries, the folds trained at once, and the preprocessing workers.

    Only ``RESULT_FIELDS`` change what a stage computes: the numbers of workers and of micro-batches set the global
    batch (and the learning rate with it), ``use_gpu`` the device and its precision (bf16 on a GPU), ``compile`` the
    kernels (compiled ones round differently from eager ones, within a tolerance). A run of W workers x A micro-batches
    computes what W x A workers would, within float32 rounding (the gradients are summed in another order), so the
    stage runs again when either changes. The others change how fast or
    how safely a stage runs, never its result, so no DVC stage depends on them (``dvc.yaml`` lists the result
    fields one by one; tests/test_wiring.py checks it against this class).
    """

    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks) of each training run")
    accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step on each worker (gradient "
                             "accumulation): the global batch is batch_size x num_workers x accum_steps, and "
                             "micro-batch m of worker r computes what worker r x accum_steps + m of a run with that "
                             "many workers would (its clips, random draws, contrastive negatives, Mixup partners)")
    use_gpu: bool = Field(False, description="one GPU per training worker (NCCL, bf16 autocast)")
    compile: Literal["auto", "none", "default", "reduce-overhead", "max-autotune"] = Field(
        "auto", description="torch.compile of the training step and of evaluation (pipeline/compiled.py): "
        "torch.compile's modes, or none; auto: none on a CPU, reduce-overhead (CUDA graphs) on a GPU")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs each training worker claims; fractional "
                                   "CPUs leave room for Ray Data on small machines")
    loader_workers: int = Field(1, ge=0, description="DataLoader worker processes of each training worker")
    max_failures: int = Field(2, ge=0, description="restarts from the last checkpoint after a worker dies")
    stop_grace_s: float = Field(20.0, gt=0, description="seconds a training stage has, after SIGTERM or Ctrl-C, to "
                                "save a checkpoint at its next step and end before it is killed (spot instances "
                                "give 30 s)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="where Ray puts a training run's workers (a placement group's strategy): PACK on as "
        "few nodes as fit, SPREAD over as many as it can, STRICT_SPREAD one node each (a run waits for that many "
        "nodes), STRICT_PACK all on one node")
    checkpoint_every: int = Field(1, ge=1, description="pre-training epochs between checkpoints (fine-tuning "
                                  "checkpoints every epoch); resuming is exact either way")
    concurrent_folds: int | None = Field(None, ge=1, description="fine-tuning folds trained at once; None: as many "
                                         "as the cluster's resources hold")
    preprocess_workers: int | None = Field(None, ge=0, description="preprocessing worker processes on Ray Data "
                                           "(each holds a face detector); None: one per CPU of the cluster; 0: no "
                                           "Ray, in the stage's own process")
    preprocess_cpus: float = Field(0.5, gt=0, description="Ray CPUs each preprocessing worker claims")

    @model_validator(mode="after")
    def _cuda_graphs_need_a_gpu(self) -> ScalingSettings:
        if self.compile == "reduce-overhead" and not self.use_gpu:
            raise ValueError("compile: reduce-overhead replays CUDA graphs and needs a GPU: set use_gpu: true, or "
                             "compile: default (or none)")
        return self


class ProgressSettings(Strict):
    """How often a stage speaks (``pipeline.console``, ``pipeline.progress``); no stage's result depends on it."""

    show_every_s: float = Field(10.0, gt=0, description="seconds between two progress lines within long work "
                                "(training steps, clips, files)")
    log_every_steps: int | None = Field(None, ge=1, description="training steps between two step-level MLflow "
                                        "points (train_step/*); None: about 20 an epoch")


# the fields of ScalingSettings that change a result
RESULT_FIELDS = ("num_workers", "accum_steps", "use_gpu", "compile")


class DataParams(Strict):
    """``params.yaml`` with the sections every stage reads checked; the training sections (checked by
    ``pipeline.config.training.Params``, a subclass) are kept as given."""

    anchors: dict[str, Any] = Field(default_factory=dict,
                                    description="YAML anchors that several sections share; not read directly")
    demo: DemoSettings = Field(default_factory=DemoSettings)
    datasets: dict[str, DatasetEntry] = Field(default_factory=lambda: {"demo": DatasetEntry(root="data/demo/raw")})
    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings)
    pretrain: dict[str, Any] = Field(default_factory=dict, description="pipeline.config.training.PretrainSettings")
    finetune: dict[str, Any] = Field(default_factory=dict, description="pipeline.config.training.FinetuneSettings")
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    progress: ProgressSettings = Field(default_factory=ProgressSettings)
    experiment: str = "hicmae"
    variant: str = Field("baseline", min_length=1,
                         description="this configuration's name, tagged on every MLflow run (ablations set it)")
    _source: str = PrivateAttr("params.yaml")  # the file these values were read from, for error messages

    @field_validator("preprocess")
    @classmethod
    def _results_only(cls, preprocess: PreprocessSettings) -> PreprocessSettings:
        """The ``preprocess`` section holds what changes the shards; how preprocessing runs is set elsewhere, so
        that changing it re-runs nothing."""
        where = {"workers": "scaling.preprocess_workers", "cpus_per_worker": "scaling.preprocess_cpus",
                 "use_ray": "scaling.preprocess_workers (0: no Ray)", "face_models": "$HICMAE_FACE_MODELS",
                 "progress": "nothing (progress always shows)"}
        misplaced = sorted(preprocess.model_fields_set & EXECUTION_FIELDS)
        if misplaced:
            raise ValueError("; ".join(f"{name} says how preprocessing runs, not what it makes: set {where[name]}"
                                       for name in misplaced))
        return preprocess

    def preprocess_settings(self) -> PreprocessSettings:
        """The ``preprocess`` section with how it runs from ``scaling``."""
        workers = self.scaling.preprocess_workers
        return self.preprocess.model_copy(update={"workers": workers or None, "use_ray": workers != 0,
                                                  "cpus_per_worker": self.scaling.preprocess_cpus})

    def dataset(self, name: str) -> DatasetEntry:
        """The entry of a dataset listed under ``datasets``; a ConfigError for one that is not listed."""
        if name not in self.datasets:
            raise ConfigError(f"{self._source}: datasets: no dataset {name!r}; listed: {', '.join(self.datasets)}")
        return self.datasets[name]


CUSTOM_ADAPTER = "custom"  # preprocessing.datasets.custom: a dataset from a clip list, with the options below
CUSTOM_OPTIONS = {"list_file": "list", "classes": "classes", "targets": "targets", "folds": "folds"}


class DatasetConfig(Strict):
    """``conf/datasets/<name>.yaml``: which adapter reads a dataset, its options, and how its training differs from
    the defaults.

    (Where the dataset lives is in ``params.yaml`` under ``datasets``, so DVC can track the folder.)
    """

    adapter: str
    list_file: str | None = Field(None, alias="list", description="custom: the clip list (.csv or .jsonl), relative "
                                  "to the dataset root; default list.csv")
    classes: list[str] | None = Field(None, min_length=2, description="custom: class names in label order; default: "
                                      "the list's labels, sorted")
    targets: list[str] | None = Field(None, min_length=1, description="custom: regression targets, one list column "
                                      "each, in output order (instead of classes)")
    folds: int | None = Field(None, ge=2, description="custom: folds to make when the list has no fold column "
                              "(default 5)")
    finetune: dict[str, Any] = Field(default_factory=dict, description="overrides of params' finetune section")
    _source: str = PrivateAttr("conf/datasets/<name>.yaml")

    @field_validator("list_file", "classes", "targets", "folds")
    @classmethod
    def _custom_option(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return value
        if info.data.get("adapter") != CUSTOM_ADAPTER:
            raise ValueError(f"an option of adapter {CUSTOM_ADAPTER} only")
        if isinstance(value, list) and len(set(value)) < len(value):
            raise ValueError("names appear more than once")
        if info.field_name == "targets" and info.data.get("classes"):
            raise ValueError("give classes (classification) or targets (regression), not both")
        return value

    def adapter_options(self, dataset: str) -> dict[str, Any]:
        """What the adapter's ``build_manifest`` takes besides the root: for ``custom``, the dataset's name and the
        options given here."""
        if self.adapter != CUSTOM_ADAPTER:
            return {}
        given = {name: getattr(self, name) for name in CUSTOM_OPTIONS if getattr(self, name) is not None}
        return {"dataset": dataset, **given}


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
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
            set_dotted(tree, key.strip(), yaml.safe_load(text))
        except (ValueError, yaml.YAMLError) as err:
            raise ConfigError(f"--set {item}: {' '.join(str(err).split())}") from None
    return tree


def validate(schema: type[BaseModel], tree: dict, source: str) -> BaseModel:
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


def load_params(path: str | Path = PROJECT_ROOT / "params.yaml", overrides: list[str] = ()) -> DataParams:
    params = validate(DataParams, apply_overrides(read_yaml(path), list(overrides)), str(path))
    params._source = str(path)
    return params


def load_dataset_config(name: str, conf_dir: str | Path = PROJECT_ROOT / "conf" / "datasets") -> DatasetConfig:
    path = Path(conf_dir) / f"{name}.yaml"
    config = validate(DatasetConfig, read_yaml(path), str(path))
    config._source = str(path)
    return config
