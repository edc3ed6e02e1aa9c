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
from .config.params import DataParams, load_dataset_config
from .console import current
from .layout import Layout, require, shown
from .progress import counter


def stage_manifest(params: DataParams, dataset: str) -> Path:
    """Run the dataset's adapter on its folder (``params.datasets[dataset].root``) and hash its media."""
    root = params.dataset(dataset).root_path()
    layout = Layout.current()
    config = load_dataset_config(dataset)
    info, clips = build_manifest(config.adapter, root, **config.adapter_options(dataset))
    clips = hash_media(clips, root, cache=layout.media_hash_cache(dataset), progress=counter)
    path = write_manifest(layout.data(dataset).manifest, info, clips)
    speakers = len({clip.speaker for clip in clips})
    kinds = f"{len(info.classes)} classes" if info.task == "classification" else f"targets {', '.join(info.targets)}"
    current().show(f"manifest {dataset}: {len(clips)} clips of {speakers} speakers, {kinds}, {info.num_folds} folds "
                   f"-> {shown(path)}")
    return path


def stage_preprocess(params: DataParams, dataset: str) -> dict:
    """Preprocess the dataset's manifest into shards; the run logs the summary, the run's figures and the per-clip
    status table. Its input is the manifest (its sha256 the digest)."""
    root = params.dataset(dataset).root_path()
    data = Layout.current().data(dataset)
    require(data.manifest, f"run `hicmae manifest --dataset {dataset}` first")
    settings = params.preprocess_settings()
    workers = f"{settings.workers or 'one per CPU'} Ray Data workers" if settings.use_ray else "in this process"
    current().show(f"preprocess {dataset}: {count_lines(data.manifest)} clips, {settings.fps} fps, "
                   f"{settings.crop_size} px faces, {workers}")
    with tracking.start_stage_run("preprocess", settings, experiment=params.experiment,
                                  run_name=f"preprocess-{dataset}",
                                  inputs=[tracking.file_input(f"{dataset}-manifest", data.manifest, "preprocessing")],
                                  tags={"dataset": dataset, "variant": params.variant}):
        summary = preprocess(data.manifest, data.processed, root, settings, bar=counter)
        tracking.log_metrics({k: v for k, v in summary.items() if k != "failed"})
        mlflow.log_artifact(str(data.summary))
        atomic_write_bytes(data.preprocess_summary, data.summary.read_bytes())
        mlflow.log_artifact(str(data.processed / STATUS_FILE))
    current().show(summary_line(dataset, summary, data))
    return summary


def count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def summary_line(dataset: str, summary: dict, data) -> str:
    """``preprocess demo: 98 of 100 clips ok (no_face 2); faces in 97.1 % of frames, median side 181 px -> ...``."""
    failed = ", ".join(f"{reason} {count}" for reason, count in summary["failed"].items())
    face = summary["face"]
    side = f", median side {face['side_px']['median']:.0f} px" if face["side_px"]["median"] is not None else ""
    return (f"preprocess {dataset}: {summary['ok']} of {summary['clips']} clips ok" + (f" ({failed})" if failed else "")
            + f"; faces found in {100 * face['detected']:.1f} % of frames{side} -> {shown(data.processed)} "
            f"({len(summary['shards'])} shards)")
