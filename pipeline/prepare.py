"""The data stages: a dataset folder to its manifest (``hicmae manifest``), the manifest to shards (``hicmae
preprocess``, on Ray Data, tracked in MLflow).

Both outputs are functions of the dataset's content and the settings alone: the manifest holds paths relative to
the dataset folder and each media file's sha256, and the shards, status table and summary hold no time stamps,
durations or absolute paths (the run's figures go to MLflow). Where the folder is comes from ``params.yaml``
(``datasets.<name>.root``) each time, so moving a dataset or cloning the project elsewhere changes nothing
downstream.
"""

from __future__ import annotations

from pathlib import Path

import mlflow

from preprocessing.datasets import build_manifest
from preprocessing.fileio import atomic_write_bytes
from preprocessing.manifest import hash_media, write_manifest
from preprocessing.run import preprocess
from preprocessing.shard_index import STATUS_FILE

from . import tracking
from .config import DataParams, load_dataset_config
from .layout import Layout, require


def stage_manifest(params: DataParams, dataset: str) -> Path:
    """Run the dataset's adapter on its folder (``params.datasets[dataset].root``) and hash its media."""
    root = params.dataset(dataset).root_path()
    layout = Layout.current()
    config = load_dataset_config(dataset)
    info, clips = build_manifest(config.adapter, root, **config.adapter_options(dataset))
    clips = hash_media(clips, root, cache=layout.media_hash_cache(dataset), progress=True)
    path = write_manifest(layout.data(dataset).manifest, info, clips)
    print(f"{dataset}: {len(clips)} clips -> {path}")
    return path


def stage_preprocess(params: DataParams, dataset: str) -> dict:
    """Preprocess the dataset's manifest into shards; the run logs the summary, the run's figures and the per-clip
    status table."""
    root = params.dataset(dataset).root_path()
    data = Layout.current().data(dataset)
    require(data.manifest, f"run `hicmae manifest --dataset {dataset}` first")
    settings = params.preprocess_settings()
    with tracking.start_stage_run("preprocess", settings, experiment=params.experiment,
                                  run_name=f"preprocess-{dataset}",
                                  tags={"dataset": dataset, "variant": params.variant}):
        summary = preprocess(data.manifest, data.processed, root, settings)
        tracking.log_metrics({k: v for k, v in summary.items() if k != "failed"})
        mlflow.log_artifact(str(data.summary))
        atomic_write_bytes(data.preprocess_summary, data.summary.read_bytes())
        mlflow.log_artifact(str(data.processed / STATUS_FILE))
    return summary
