"""The fine-tuning stage: every configured test fold of a dataset, one Ray Train run each, tracked in MLflow.

    hicmae finetune --dataset demo

Clean protocol (default): the best epoch is chosen on a speaker-disjoint validation split carved from the
training folds; the test fold is evaluated once, with both the last-epoch and the best-epoch weights.
``protocol: reference`` selects on the test fold itself, as the reference code does.

Writes ``runs/<dataset>/finetune/fold-k/`` (``layout.FOLD_RESULT_FILES`` and the exported best model), the
dataset's ``info.json`` and confusion-matrix plots, and the fold mean/std in ``runs/<dataset>/metrics.json``.
MLflow: a parent run ``finetune-<dataset>`` with the fold summary, a nested run per fold, in which the fold's model
is logged and registered as a version of ``hicmae-<dataset>``; the alias ``best`` names the fold chosen on validation
(``pipeline.registry``). Each model card records how its test metrics were computed (``how_tested``), for
``hicmae verify``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch

from preprocessing.fileio import atomic_write_bytes, sha256_file, write_json
from preprocessing.manifest import ClipRecord, DatasetInfo, read_manifest, split_for_fold
from preprocessing.settings import PreprocessSettings
from preprocessing.shard_index import ShardIndex

from .. import registry, tracking
from ..config.params import DataParams, ScalingSettings, load_dataset_config
from ..config.training import (
    FinetuneSettings,
    Params,
    WindowSettings,
    finetune_settings_for,
    training_params,
)
from ..console import Console, current
from ..data.loaders import clip_catalog, shards_hash, verified_shards
from ..layout import (
    FOLD_RESULT_FILES,
    HISTORY_FILE,
    PREDICTION_EPOCHS,
    FinetuneRun,
    Layout,
    predictions_file,
    require,
    shown,
)
from ..metrics import aggregate_folds, selection_metric
from . import raytrain
from .compiled import resolve
from .export import CARD_FILE, export_checkpoint, init_weights, resolve_init
from .finetune_fold import finetune_worker
from .loop import run_options
from .preemption import Preempted, on_signals
from .resume import RunInputs, forget, run_inputs


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


def fold_config(settings: FinetuneSettings, info: DatasetInfo, fold: int, split: dict[str, list[str]], catalog: dict,
                init: str | None, options: dict | None = None) -> dict:
    """What the Ray Train workers of one fold get (``finetune.FinetuneTask``): the split's clips and where each
    lies in the shards, and how to run (``training.run_options``). A clip that preprocessing could not use (no
    face, unreadable) is left out."""
    split = {part: [clip for clip in ids if clip in catalog] for part, ids in split.items()}
    return {"settings": settings.model_dump(mode="json"), "info": info.model_dump(mode="json"), "split": split,
            "label": f"{info.name} fold {fold}",
            "clips": {clip: catalog[clip] for ids in split.values() for clip in ids}, "init": init,
            **(options or run_options())}


def how_tested(config: dict, scaling: ScalingSettings, folder: Path) -> dict:
    """How a fold's test metrics were computed (``FinetuneTask.final_files``), for its model card; ``hicmae verify``
    computes them again from it: the test clips in the order the ranks shared them, the views and batch size of
    ``evaluation.evaluation_inputs``, the number of ranks, the weights (the best epoch's), the device and compile
    mode of the forward, and the sha256 of the best weights' per-clip predictions (in the last checkpoint
    ``folder``)."""
    device = "cuda" if scaling.use_gpu else "cpu"
    return {"clips": config["split"]["test"], "views": config["settings"]["test_views"],
            "batch_size": config["settings"]["batch_size"], "ranks": scaling.num_workers, "weights": "best",
            "device": device, "compile": resolve(scaling.compile, torch.device(device)),
            "predictions_sha256": sha256_file(folder / predictions_file("best"))}


@dataclass(frozen=True)
class FoldJob:
    """One fold's Ray Train run and its outputs, for any fold of ``configs`` (picklable: it runs as a Ray task,
    ``raytrain.run_concurrently``)."""

    configs: dict[int, dict]      # fold -> fold_config(...)
    info: DatasetInfo
    scaling: ScalingSettings
    out: FinetuneRun
    storage: Path
    data_hash: str
    window: WindowSettings
    preprocess: PreprocessSettings
    inputs: dict[int, RunInputs]  # fold -> what decides its result (``resume``)

    def __call__(self, fold: int) -> str:
        """Fine-tune ``fold``; copy its result files from the last checkpoint and export its best model. Returns the
        run's folder, for the stage to ``resume.forget`` once every fold is done."""
        result = raytrain.run_trainer(finetune_worker, self.configs[fold], self.scaling,
                                      name=f"finetune-{self.info.name}-fold{fold}", storage=self.storage,
                                      inputs=self.inputs[fold])
        with result.checkpoint.as_directory() as folder:
            self.keep(fold, Path(folder))
        fold_run = self.out.fold(fold)
        test = json.loads(fold_run.test_metrics.read_text())
        (self.configs[fold]["console"] or Console()).show(
            f"{self.info.name} fold {fold}: done, best epoch {test['best_epoch'] + 1} -> {shown(fold_run.model)}")
        return str(result.path)

    def keep(self, fold: int, folder: Path) -> None:
        """Copy ``fold``'s result files from its last checkpoint ``folder`` into ``fold-k/`` and export its best model,
        with how its test metrics were computed (``how_tested``), to ``fold-k/model/``."""
        fold_run = self.out.fold(fold)
        for name in FOLD_RESULT_FILES:
            atomic_write_bytes(fold_run.file(name), (folder / name).read_bytes())
        export_checkpoint(folder, self.info, fold_run.model, data_hash=self.data_hash,
                          source=f"{self.info.name} fine-tuning, test fold {fold}, best epoch",
                          name=f"{self.info.name}-fold{fold}", window=self.window, preprocess=self.preprocess,
                          evaluation=how_tested(self.configs[fold], self.scaling, folder))


def run_folds(params: Params, settings: FinetuneSettings, layout: Layout, dataset: str, shards: list[ShardIndex],
              init: str | None, tracker_for_fold=None) -> tuple[dict[int, dict], dict[int, str], list[str]]:
    """Fine-tune every configured fold on ``shards`` (``data.verified_shards``), as many at once as the cluster's
    resources hold for ``params.scaling`` (at most ``scaling.concurrent_folds``); each writes its files and its
    best model exported to ``fold-k/model/``. Returns the test metrics of the folds that finished and the error of
    each that failed (after Ray Train's retries), by fold, and the finished folds' run folders. Stopped on request
    (SIGTERM, Ctrl-C), it raises ``Preempted`` once every running fold saved a checkpoint."""
    info, clips = read_manifest(layout.data(dataset).manifest)
    catalog = clip_catalog(shards)
    folds = settings.folds or list(range(1, info.num_folds + 1))
    console = raytrain.worker_console()  # Ray started: its signal handlers are in place, on_signals replaces them
    data_hash = shards_hash(shards)
    data = {"shards": data_hash, **({"init": sha256_file(init)} if init else {})}
    splits = {fold: fold_splits(clips, fold, settings) for fold in folds}
    inputs = {fold: run_inputs({**data, "split": hashlib.sha256(json.dumps(splits[fold]).encode()).hexdigest()},
                               settings, params.scaling, fold=fold) for fold in folds}
    out = layout.finetune(dataset)
    limit = raytrain.runs_that_fit(params.scaling, params.scaling.concurrent_folds)
    source = f"from {shown(init)}" if init else "from scratch"
    current().show(f"finetune {dataset}: folds {', '.join(map(str, folds))} of {info.num_folds}, "
                   f"{min(limit, len(folds))} at a time, {source}; {settings.protocol} protocol")
    with on_signals(layout.ray_results) as stop:
        configs = {fold: fold_config(settings, info, fold, splits[fold], catalog, init,
                                     run_options(params.scaling, params.progress,
                                                 tracker_for_fold(fold) if tracker_for_fold else None, console,
                                                 str(stop.path)))
                   for fold in folds}
        job = FoldJob(configs, info, params.scaling, out, layout.ray_results, data_hash, settings.window,
                      params.preprocess, inputs)
        returned, failed = raytrain.run_concurrently(job, folds, limit=limit, stop=stop)
        if stop.requested:
            raise Preempted(stopped_folds(dataset, stop.signal, folds, returned, failed))
    per_fold = {fold: json.loads(out.fold(fold).test_metrics.read_text()) for fold in folds if fold not in failed}
    return per_fold, failed, list(returned.values())


def stopped_folds(dataset: str, reason: str, folds: list[int], returned: dict, failed: dict[int, str]) -> str:
    """The line of a fine-tuning stage stopped on request: what became of each fold, and how to continue."""
    kinds = {"done": [f for f in folds if f in returned],
             "stopped with a checkpoint": [f for f in folds if Preempted.__name__ in failed.get(f, "")],
             "failed": [f for f in folds if f in failed and Preempted.__name__ not in failed[f]],
             "not started": [f for f in folds if f not in returned and f not in failed]}
    said = "; ".join(f"fold{'s' if len(found) > 1 else ''} {', '.join(map(str, found))} {kind}"
                     for kind, found in kinds.items() if found)
    return (f"finetune {dataset}: stopped on request ({reason}): {said}; run the same command (or `dvc repro`) to "
            "continue from there")


def stage_finetune(params: DataParams, dataset: str) -> dict:
    """``hicmae finetune --dataset D``: all folds of one dataset; a parent MLflow run with the fold mean/std, one
    nested run per fold. A fold that fails does not stop the others; the stage then fails naming it."""
    params = training_params(params)
    params.dataset(dataset)
    tracking.require_reachable(tracking.tracking_uri())  # before the shards' hashes: a missing server is said at once
    settings = finetune_settings_for(params, load_dataset_config(dataset))
    layout = Layout.current()
    data, out = layout.data(dataset), layout.finetune(dataset)
    require(data.manifest, f"run `hicmae manifest --dataset {dataset}` first")
    require(data.processed, f"run `hicmae preprocess --dataset {dataset}` first")
    init = resolve_init(settings.init, layout.pretrain.checkpoint)  # a repo id: fetched here, once
    if init:
        init = str(require(init, "run `hicmae pretrain` first, or set finetune.init to none, a checkpoint file, an "
                                 "exported folder or a Hub repo id"))
        init_weights(init)  # a file that cannot be used is said here, once, not by each fold's Ray Train workers
    info, _ = read_manifest(data.manifest)
    shards = verified_shards(data.processed, f"run `hicmae preprocess --dataset {dataset}` again to redo it")
    data_hash = shards_hash(shards)
    inputs = [tracking.shards_input(dataset, data.processed, shards, data_hash)]
    if init:  # the weights it starts from: pre-training's checkpoint (its run's tag checkpoint_sha256) or a file
        inputs.append(tracking.file_input(shown(init), init, "init"))
    with tracking.start_stage_run("finetune", settings, experiment=params.experiment, run_name=f"finetune-{dataset}",
                                  data_hash=data_hash, inputs=inputs,
                                  tags={"dataset": dataset, "protocol": settings.protocol,
                                        "variant": params.variant}) as parent:
        fold_runs: dict[int, tracking.RunLogger] = {}

        def fold_logger(fold: int) -> tracking.RunLogger:
            fold_runs[fold] = tracking.start_child_run(parent, f"{dataset}-fold{fold}", {
                "fold": str(fold), "dataset": dataset, "dvc_stage": "finetune"}, params={"fold": fold})
            return fold_runs[fold]

        try:
            per_fold, failed, run_folders = run_folds(params, settings, layout, dataset, shards, init,
                                                      tracker_for_fold=fold_logger)
        except BaseException as err:
            for run in fold_runs.values():
                run.finish(status="KILLED" if isinstance(err, Preempted) else "FAILED")
            raise
        registry.register_folds(dataset, fold_models(out, {f: fold_runs[f] for f in per_fold}),
                                {"dataset": dataset, "variant": params.variant, "data_hash": data_hash,
                                 "protocol": settings.protocol,
                                 "selection_metric": selection_metric(info.task, settings.protocol)})
        for fold, run in fold_runs.items():
            if fold in per_fold:
                run.finish({"test": per_fold[fold]["best"], "test_last": per_fold[fold]["last"]})
            else:
                run.finish(status="FAILED")
        if failed:
            raise RuntimeError(f"{dataset}: fine-tuning failed for fold(s) {', '.join(map(str, sorted(failed)))}: "
                               + "; ".join(f"fold {fold}: {error}" for fold, error in sorted(failed.items())))
        folds = sorted(per_fold)
        summary = {"folds": folds, **{epoch: aggregate_folds([per_fold[f][epoch] for f in folds])
                                      for epoch in ("last", "best")}}
        write_json(out.metrics, summary)
        write_json(out.info, describe_dataset(info, settings.protocol))
        tracking.log_metrics({"test": summary["best"], "test_last": summary["last"]})
        log_fold_artifacts(out, summary, info)
    for folder in run_folders:  # the outputs are written: nothing left to continue
        forget(folder)
    for line in summary_table(per_fold, info, summary):
        current().show(line)
    current().show(f"finetune {dataset}: -> {shown(out.metrics)}, {shown(out.folder)}/fold-*/")
    return summary


def fold_models(out: FinetuneRun, runs: dict[int, tracking.RunLogger]) -> dict[int, tuple[str, Path, float]]:
    """Each finished fold's MLflow run id, exported model folder and validation score (its card's), by fold: what
    ``registry.register_folds`` registers."""
    found = {}
    for fold, run in runs.items():
        folder = out.fold(fold).model
        card = json.loads((folder / CARD_FILE).read_text())
        found[fold] = (run.run_id, folder, card["metrics"]["validation_score"])
    return found


def summary_table(per_fold: dict[int, dict], info: DatasetInfo, summary: dict) -> list[str]:
    """The test metrics of the best epoch's weights by fold, and their mean ± std, as console lines (percent for
    classification)."""
    if info.task == "classification":
        columns, scale, digits = {"uar": "UAR", "war": "WAR", "f1_macro": "F1 macro"}, 100, 1
    else:
        columns = {"ccc_mean": "CCC", **{f"ccc/{t}": f"CCC {t}" for t in info.targets}, "mae_mean": "MAE"}
        scale, digits = 1, 3
    width = max(13, *(len(title) + 2 for title in columns.values()))
    lines = [f"{'test fold':>10}" + "".join(f"{title:>{width}}" for title in columns.values())]
    for fold, metrics in sorted(per_fold.items()):
        best = metrics["best"]
        lines.append(f"{fold:>10}" + "".join(f"{scale * best[name]:>{width}.{digits}f}" for name in columns))
    best = summary["best"]
    spread = [f"{scale * best[f'{name}_mean']:.{digits}f} ± {scale * best[f'{name}_std']:.{digits}f}"
              for name in columns]
    lines.append(f"{'mean ± std':>10}" + "".join(f"{text:>{width}}" for text in spread))
    return lines


def log_fold_artifacts(out: FinetuneRun, summary: dict, info: DatasetInfo) -> None:
    """Per-clip predictions, the per-epoch history and confusion-matrix plots of every fold into the parent run."""
    # Here, not with the module: matplotlib and scikit-learn (~0.6 s) for the stage's end alone, not for every
    # fold's Ray task, which imports this module to run its ``FoldJob``.
    from ..plots import confusion_matrix_figure, save_figure

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
