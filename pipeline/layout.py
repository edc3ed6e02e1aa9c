"""Where every stage reads and writes: the run layout and its file names, in one place.

Under the work root (the project, or ``$HICMAE_WORKDIR`` when set, e.g. a folder every cluster node sees):

    data/<dataset>/manifest.jsonl, manifest.info.json   the adapter's manifest
    data/<dataset>/processed/                           shards/, units/, status.jsonl, summary.json (preprocessing)
    data/<dataset>/preprocess_summary.json              a copy of summary.json: the stage's DVC metric
    runs/pretrain/                                      checkpoint.pt, metrics.json, history.csv, model/ (the
                                                        whole pre-training model exported, the Hub's layout)
    runs/<dataset>/metrics.json                         fold mean and std of the test metrics (last and best epoch)
    runs/<dataset>/finetune/                            info.json, plots/, and per test fold k:
    runs/<dataset>/finetune/fold-k/                     test_metrics.json, predictions_{last,best}.csv, history.csv,
                                                        embeddings_best.npz, model/ (the exported best model)
    reports/                                            results.{md,json}, plots/, curves/ (pipeline/report.py)
    ray_results/                                        Ray Train's run folders (checkpoints while training)
    .cache/media-hashes/<dataset>.json                  the manifest stage's file hashes by size and mtime
    .cache/registered-models/<model id>/                registered models downloaded from MLflow (``registry``)

What DVC tracks (data/, runs/, reports/) holds results only; what a run did and how long it took goes to MLflow.

A Ray Train checkpoint folder holds ``state.pt`` (model, optimizer, epoch, the loop's own state) and, in a
fine-tuning fold's last checkpoint, the fold's result files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from preprocessing.errors import InputError
from preprocessing.shard_index import SUMMARY_FILE

PROJECT_ROOT = Path(__file__).resolve().parents[1]

CHECKPOINT_STATE = "state.pt"            # in every Ray Train checkpoint folder
HISTORY_FILE = "history.csv"             # per-epoch metrics of a training run
TEST_METRICS_FILE = "test_metrics.json"  # a fold's test metrics with the last and the best weights
EMBEDDINGS_FILE = "embeddings_best.npz"  # a fold's test-clip embeddings (best weights)
INFO_FILE = "info.json"                  # a dataset's classes/targets, protocol and selection metric
PREDICTION_EPOCHS = ("last", "best")     # the two weights every fold is tested with


def predictions_file(epoch: str) -> str:
    """``predictions_last.csv`` or ``predictions_best.csv``."""
    return f"predictions_{epoch}.csv"


# What a fine-tuning fold writes, into its last Ray checkpoint and then into runs/<dataset>/finetune/fold-k/.
FOLD_RESULT_FILES = (TEST_METRICS_FILE, *(predictions_file(e) for e in PREDICTION_EPOCHS), EMBEDDINGS_FILE,
                     HISTORY_FILE)


def require(path: Path, hint: str) -> Path:
    """``path`` if it exists, else a ``MissingInput`` naming it and what to do (``hint``)."""
    if not path.exists():
        raise MissingInput(f"{path}: missing; {hint}")
    return path


class MissingInput(InputError, FileNotFoundError):
    """A file or folder a stage needs is not there: the CLI prints it as one line."""


def work_root() -> Path:
    """Where data/, runs/, reports/ and ray_results/ live: ``$HICMAE_WORKDIR`` or the project."""
    return Path(os.environ.get("HICMAE_WORKDIR", PROJECT_ROOT))


def shown(path: str | os.PathLike) -> str:
    """``path`` for a console line: relative to the work root when inside it, else as it is."""
    path, root = Path(path), work_root()
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class DatasetData:
    """data/<dataset>/: the manifest and the preprocessed shards."""

    folder: Path

    @property
    def manifest(self) -> Path:
        return self.folder / "manifest.jsonl"

    @property
    def processed(self) -> Path:
        return self.folder / "processed"

    @property
    def preprocess_summary(self) -> Path:
        return self.folder / "preprocess_summary.json"

    @property
    def summary(self) -> Path:
        """The summary preprocessing writes inside processed/."""
        return self.processed / SUMMARY_FILE


@dataclass(frozen=True)
class PretrainRun:
    """runs/pretrain/: the encoder checkpoint the fine-tuning stages start from."""

    folder: Path

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint.pt"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.json"

    @property
    def history(self) -> Path:
        return self.folder / HISTORY_FILE

    @property
    def model(self) -> Path:
        """The pre-training model exported (``pipeline.train.export.export_pretrained``)."""
        return self.folder / "model"


@dataclass(frozen=True)
class FoldRun:
    """runs/<dataset>/finetune/fold-k/: one test fold's results and exported model."""

    folder: Path

    def file(self, name: str) -> Path:
        return self.folder / name

    @property
    def test_metrics(self) -> Path:
        return self.folder / TEST_METRICS_FILE

    def predictions(self, epoch: str) -> Path:
        return self.folder / predictions_file(epoch)

    @property
    def history(self) -> Path:
        return self.folder / HISTORY_FILE

    @property
    def embeddings(self) -> Path:
        return self.folder / EMBEDDINGS_FILE

    @property
    def model(self) -> Path:
        return self.folder / "model"


@dataclass(frozen=True)
class FinetuneRun:
    """runs/<dataset>/: the fine-tuning stage's folds, plots and fold summary."""

    dataset_runs: Path

    @property
    def folder(self) -> Path:
        return self.dataset_runs / "finetune"

    @property
    def metrics(self) -> Path:
        """Fold mean and std of the test metrics: the stage's DVC metric."""
        return self.dataset_runs / "metrics.json"

    @property
    def info(self) -> Path:
        return self.folder / INFO_FILE

    @property
    def plots(self) -> Path:
        return self.folder / "plots"

    def fold(self, fold: int) -> FoldRun:
        return FoldRun(self.folder / f"fold-{fold}")


@dataclass(frozen=True)
class Layout:
    """The run layout under one work root (default: ``work_root()``, read when constructed)."""

    root: Path

    @classmethod
    def current(cls) -> Layout:
        return cls(work_root())

    def data(self, dataset: str) -> DatasetData:
        return DatasetData(self.root / "data" / dataset)

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def pretrain(self) -> PretrainRun:
        return PretrainRun(self.runs / "pretrain")

    def finetune(self, dataset: str) -> FinetuneRun:
        return FinetuneRun(self.runs / dataset)

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def ray_results(self) -> Path:
        return self.root / "ray_results"

    def log_file(self, command: str, dataset: str | None = None) -> Path:
        """The log of a stage's last run (``pipeline.console``; not an output): ``logs/<command>[-<dataset>].log``."""
        return self.root / "logs" / (f"{command}-{dataset}.log" if dataset else f"{command}.log")

    def registered_model(self, model_id: str) -> Path:
        """Where a model of MLflow's Model Registry is kept once downloaded (``pipeline.registry``; not an output), by
        the id of the logged model a version points at (unique across tracking stores)."""
        return self.root / ".cache" / "registered-models" / model_id

    def media_hash_cache(self, dataset: str) -> Path:
        """Where the manifest stage remembers the sha256 of a dataset's media files (not an output)."""
        return self.root / ".cache" / "media-hashes" / f"{dataset}.json"
