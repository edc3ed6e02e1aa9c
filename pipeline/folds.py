"""The fine-tuning stage: every configured test fold of a dataset, one Ray Train run each, tracked in MLflow.

    hicmae finetune --dataset demo

Clean protocol (default): the best epoch is chosen on a speaker-disjoint validation split carved from the
training folds; the test fold is evaluated once, with both the last-epoch and the best-epoch weights.
``protocol: reference`` selects on the test fold itself, as the reference code does.

Writes ``runs/<dataset>/finetune/fold-k/`` (``layout.FOLD_RESULT_FILES`` and the exported best model), the
dataset's ``info.json`` and confusion-matrix plots, and the fold mean/std in ``runs/<dataset>/metrics.json``.
MLflow: a parent run ``finetune-<dataset>`` with the fold summary, a nested run per fold.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from preprocessing.fileio import atomic_write_bytes, write_json
from preprocessing.manifest import ClipRecord, DatasetInfo, read_manifest, split_for_fold
from preprocessing.shard_index import ShardIndex

from . import raytrain, tracking
from .config import DataParams, load_dataset_config
from .data import clip_catalog, shards_hash, verified_shards
from .export import export_checkpoint
from .finetune import finetune_worker
from .layout import FOLD_RESULT_FILES, HISTORY_FILE, PREDICTION_EPOCHS, FinetuneRun, Layout, require
from .metrics import aggregate_folds, selection_metric
from .plots import confusion_matrix_figure, save_figure
from .settings import FinetuneSettings, Params, finetune_settings_for, training_params


def fold_splits(clips: list[ClipRecord], fold: int, settings: FinetuneSettings) -> dict[str, list[str]]:
    """Clip ids of train / val / test for one test fold under the configured protocol."""
    if settings.protocol == "reference":
        split = split_for_fold(clips, fold, val_fraction=0.0)
        split["val"] = split["test"]  # the reference picks its best epoch on the test fold
    else:
        split = split_for_fold(clips, fold, settings.val_fraction, seed=settings.seed)
    return {name: [clip.clip_id for clip in rows] for name, rows in split.items()}


def describe_dataset(info: DatasetInfo, protocol: str) -> dict:
    """What a fine-tuning run's ``info.json`` holds: the dataset's description and the epoch-selection metric."""
    return {"dataset": info.model_dump(mode="json"), "protocol": protocol,
            "selection_metric": selection_metric(info.task, protocol)}


def fold_config(settings: FinetuneSettings, info: DatasetInfo, split: dict[str, list[str]], catalog: dict,
                init: str | None, loader_workers: int, tracker=None) -> dict:
    """What the Ray Train workers of one fold get (``finetune.FinetuneTask``): the split's clips and where each
    lies in the shards. A clip that preprocessing could not use (no face, unreadable) is left out."""
    split = {part: [clip for clip in ids if clip in catalog] for part, ids in split.items()}
    return {"settings": settings.model_dump(mode="json"), "info": info.model_dump(mode="json"), "split": split,
            "clips": {clip: catalog[clip] for ids in split.values() for clip in ids}, "init": init,
            "loader_workers": loader_workers, "tracker": tracker}


def run_folds(params: Params, settings: FinetuneSettings, layout: Layout, dataset: str, shards: list[ShardIndex],
              init: str | None, tracker_for_fold=None) -> dict:
    """Fine-tune every configured fold on ``shards`` (``data.verified_shards``); writes each fold's files and its
    best model exported to ``fold-k/model/`` (``pipeline.export``); returns the fold mean/std summary."""
    info, clips = read_manifest(layout.data(dataset).manifest)
    catalog, data_hash = clip_catalog(shards), shards_hash(shards)
    out = layout.finetune(dataset)
    folds = settings.folds or list(range(1, info.num_folds + 1))
    per_fold = {}
    for fold in folds:
        config = fold_config(settings, info, fold_splits(clips, fold, settings), catalog, init,
                             params.scaling.loader_workers, tracker_for_fold(fold) if tracker_for_fold else None)
        result = raytrain.run_trainer(finetune_worker, config, params.scaling, name=f"finetune-{info.name}-fold{fold}",
                                      storage=layout.ray_results)
        fold_run = out.fold(fold)
        with result.checkpoint.as_directory() as folder:
            for name in FOLD_RESULT_FILES:
                atomic_write_bytes(fold_run.file(name), (Path(folder) / name).read_bytes())
            export_checkpoint(folder, info, fold_run.model, data_hash=data_hash, name=f"{info.name}-fold{fold}",
                              window=settings.window, preprocess=params.preprocess)
        per_fold[fold] = json.loads(fold_run.test_metrics.read_text())
    return {"folds": folds, **{epoch: aggregate_folds([per_fold[f][epoch] for f in folds])
                               for epoch in ("last", "best")}}


def stage_finetune(params: DataParams, dataset: str) -> dict:
    """``hicmae finetune --dataset D``: all folds of one dataset; a parent MLflow run with the fold mean/std, one
    nested run per fold."""
    params = training_params(params)
    params.dataset(dataset)
    settings = finetune_settings_for(params, load_dataset_config(dataset))
    layout = Layout.current()
    data, out = layout.data(dataset), layout.finetune(dataset)
    require(data.manifest, f"run `hicmae manifest --dataset {dataset}` first")
    require(data.processed, f"run `hicmae preprocess --dataset {dataset}` first")
    init = {"pretrain": str(layout.pretrain.checkpoint), "none": None}.get(settings.init, settings.init)
    if init:
        require(Path(init), "run `hicmae pretrain` first, or set finetune.init to none or a checkpoint file")
    info, _ = read_manifest(data.manifest)
    shards = verified_shards(data.processed, f"run `hicmae preprocess --dataset {dataset}` again to redo it")
    with tracking.start_stage_run("finetune", settings, experiment=params.experiment, run_name=f"finetune-{dataset}",
                                  data_hash=shards_hash(shards),
                                  tags={"dataset": dataset, "protocol": settings.protocol,
                                        "variant": params.variant}) as parent:
        fold_runs: dict[int, tracking.RunLogger] = {}

        def fold_logger(fold: int) -> tracking.RunLogger:
            fold_runs[fold] = tracking.start_child_run(parent, f"{dataset}-fold{fold}", {
                "fold": str(fold), "dataset": dataset, "dvc_stage": "finetune"})
            return fold_runs[fold]

        try:
            summary = run_folds(params, settings, layout, dataset, shards, init, tracker_for_fold=fold_logger)
        except BaseException:
            for run in fold_runs.values():
                run.finish(status="FAILED")
            raise
        for fold, run in fold_runs.items():
            test = json.loads(out.fold(fold).test_metrics.read_text())
            run.finish({"test": test["best"], "test_last": test["last"]})
        write_json(out.metrics, summary)
        write_json(out.info, describe_dataset(info, settings.protocol))
        tracking.log_metrics({"test": summary["best"], "test_last": summary["last"]})
        log_fold_artifacts(out, summary, info)
    return summary


def log_fold_artifacts(out: FinetuneRun, summary: dict, info: DatasetInfo) -> None:
    """Per-clip predictions, the per-epoch history and confusion-matrix plots of every fold into the parent run."""
    for fold in summary["folds"]:
        fold_run = out.fold(fold)
        metrics = json.loads(fold_run.test_metrics.read_text())
        mlflow.log_artifact(str(fold_run.file(HISTORY_FILE)), f"fold-{fold}")
        for epoch in PREDICTION_EPOCHS:
            mlflow.log_artifact(str(fold_run.predictions(epoch)), f"fold-{fold}")
            if info.task == "classification":
                figure = confusion_matrix_figure(metrics[epoch]["confusion_matrix"], info.classes,
                                                 title=f"{info.name} fold {fold} ({epoch} epoch)")
                path = save_figure(figure, out.plots / f"confusion_fold{fold}_{epoch}.png")
                mlflow.log_artifact(str(path), "plots")
