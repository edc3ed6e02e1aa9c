"""The data stages: a dataset folder to its manifest (``hicmae manifest``), the manifest to shards (``hicmae
preprocess``, on Ray Data, tracked in MLflow)."""

from __future__ import annotations

from pathlib import Path

import mlflow

from preprocessing.datasets import build_manifest
from preprocessing.fileio import atomic_write_bytes
from preprocessing.manifest import write_manifest
from preprocessing.run import preprocess
from preprocessing.shard_index import STATUS_FILE

from . import tracking
from .config import DataParams, load_dataset_config
from .layout import Layout, require


def stage_manifest(params: DataParams, dataset: str) -> Path:
    """Run the dataset's adapter on its folder (``params.datasets[dataset].root``)."""
    root = params.dataset(dataset).root_path()
    info, clips = build_manifest(load_dataset_config(dataset).adapter, root)
    path = write_manifest(Layout.current().data(dataset).manifest, info, clips)
    print(f"{dataset}: {len(clips)} clips -> {path}")
    return path


def stage_preprocess(params: DataParams, dataset: str) -> dict:
    """Preprocess the dataset's manifest into shards; the run logs the summary and the per-clip status table."""
    params.dataset(dataset)
    data = Layout.current().data(dataset)
    require(data.manifest, f"run `hicmae manifest --dataset {dataset}` first")
    with tracking.start_stage_run("preprocess", params.preprocess, experiment=params.experiment,
                                  run_name=f"preprocess-{dataset}",
                                  tags={"dataset": dataset, "variant": params.variant}):
        summary = preprocess(data.manifest, data.processed, params.preprocess)
        tracking.log_metrics({k: v for k, v in summary.items() if k != "failed"})
        mlflow.log_artifact(str(data.summary))
        atomic_write_bytes(data.preprocess_summary, data.summary.read_bytes())
        mlflow.log_artifact(str(data.processed / STATUS_FILE))
    return summary
