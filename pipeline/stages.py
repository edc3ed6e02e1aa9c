"""The pipeline stages as functions: what ``dvc.yaml`` runs through the CLI, each tracked in MLflow.

Layout (under the project root, or ``$HICMAE_WORKDIR`` when set):
    data/<dataset>/manifest.jsonl     adapter output
    data/<dataset>/processed/         shards/, status.jsonl, summary.json
    runs/pretrain/                    checkpoint.pt, metrics.json, history.csv
    runs/<dataset>/finetune/          info.json, fold-k/{test_metrics.json, predictions_*.csv, history.csv,
                                      embeddings_best.npz}, plots/
    runs/<dataset>/metrics.json       fold mean and std of the test metrics (last and best epoch)
    reports/                          results.{md,json}, plots/, curves/ (see pipeline/report.py)
    ray_results/                      Ray Train's run folders (checkpoints while training)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow

from preprocessing.datasets import build_manifest
from preprocessing.manifest import read_manifest, write_json, write_manifest
from preprocessing.run import preprocess

from . import tracking
from .config import PROJECT_ROOT, Params, finetune_settings_for, load_dataset_config
from .finetune import run_finetune
from .plots import confusion_matrix_figure, save_figure
from .pretrain import run_pretrain
from .raytrain import HISTORY_FILE
from .report import INFO_FILE, describe_dataset, write_report


def work_root() -> Path:
    """Where data/, runs/ and reports/ live: the project, or ``$HICMAE_WORKDIR``."""
    return Path(os.environ.get("HICMAE_WORKDIR", PROJECT_ROOT))


def data_dir(dataset: str) -> Path:
    return work_root() / "data" / dataset


def runs_dir(*parts: str) -> Path:
    return work_root().joinpath("runs", *parts)


def stage_manifest(dataset: str, params: Params) -> Path:
    """Run the dataset's adapter on its configured folder."""
    if dataset not in params.datasets:
        raise KeyError(f"dataset {dataset!r} is not listed under datasets in params.yaml")
    config = load_dataset_config(dataset)
    info, clips = build_manifest(config.adapter, params.datasets[dataset].root_path())
    path = write_manifest(data_dir(dataset) / "manifest.jsonl", info, clips)
    print(f"{dataset}: {len(clips)} clips -> {path}")
    return path


def stage_preprocess(dataset: str, params: Params) -> dict:
    out = data_dir(dataset) / "processed"
    with tracking.start_stage_run("preprocess", params.preprocess, experiment=params.experiment,
                                  run_name=f"preprocess-{dataset}",
                                  tags={"dataset": dataset, "variant": params.variant}):
        summary = preprocess(data_dir(dataset) / "manifest.jsonl", out, params.preprocess)
        tracking.log_metrics({k: v for k, v in summary.items() if k != "failed"})
        mlflow.log_artifact(str(out / "summary.json"))
        shutil.copyfile(out / "summary.json", data_dir(dataset) / "preprocess_summary.json")
        mlflow.log_artifact(str(out / "status.jsonl"))
    return summary


def stage_pretrain(params: Params) -> dict:
    dataset = params.pretrain.dataset
    processed = data_dir(dataset) / "processed"
    with tracking.start_stage_run("pretrain", params.pretrain, experiment=params.experiment,
                                  run_name=f"pretrain-{dataset}", data_hash=tracking.hash_directory(processed),
                                  tags={"dataset": dataset, "variant": params.variant}) as run:
        logger = tracking.RunLogger(mlflow.get_tracking_uri(), run.info.run_id)
        metrics = run_pretrain(params, processed, runs_dir("pretrain"), tracker=logger,
                               storage=work_root() / "ray_results")
        tracking.log_metrics({f"final/{k}": v for k, v in metrics.items()})
    return metrics


def stage_finetune(dataset: str, params: Params) -> dict:
    """All folds of one dataset: a parent run with the fold mean/std, one nested run per fold."""
    settings = finetune_settings_for(params, load_dataset_config(dataset))
    manifest, processed = data_dir(dataset) / "manifest.jsonl", data_dir(dataset) / "processed"
    out = runs_dir(dataset, "finetune")
    init = {"pretrain": str(runs_dir("pretrain", "checkpoint.pt")), "none": None}.get(settings.init, settings.init)
    info, _ = read_manifest(manifest)
    data_hash = tracking.hash_directory(processed)  # once: the run's tag and every exported model card
    with tracking.start_stage_run("finetune", settings, experiment=params.experiment, run_name=f"finetune-{dataset}",
                                  data_hash=data_hash,
                                  tags={"dataset": dataset, "protocol": settings.protocol,
                                        "variant": params.variant}) as parent:
        fold_runs: dict[int, tracking.RunLogger] = {}

        def fold_logger(fold: int) -> tracking.RunLogger:
            fold_runs[fold] = tracking.start_child_run(parent, f"{dataset}-fold{fold}", {
                "fold": str(fold), "dataset": dataset, "dvc_stage": "finetune"})
            return fold_runs[fold]

        try:
            summary = run_finetune(params, settings, manifest, processed, out, init, tracker_for_fold=fold_logger,
                                   storage=work_root() / "ray_results", data_hash=data_hash)
        except BaseException:
            for run in fold_runs.values():
                run.finish(status="FAILED")
            raise
        for fold, run in fold_runs.items():
            test = json.loads((out / f"fold-{fold}" / "test_metrics.json").read_text())
            run.finish({"test": test["best"], "test_last": test["last"]})
        write_json(runs_dir(dataset, "metrics.json"), summary)
        write_json(out / INFO_FILE, describe_dataset(info, settings.protocol))
        tracking.log_metrics({"test": summary["best"], "test_last": summary["last"]})
        _log_fold_artifacts(out, summary, info)
    return summary


def _log_fold_artifacts(out: Path, summary: dict, info) -> None:
    """Per-clip predictions, the per-epoch history and confusion-matrix plots of every fold into the parent run."""
    for fold in summary["folds"]:
        fold_dir = out / f"fold-{fold}"
        metrics = json.loads((fold_dir / "test_metrics.json").read_text())
        mlflow.log_artifact(str(fold_dir / HISTORY_FILE), f"fold-{fold}")
        for name in ("best", "last"):
            mlflow.log_artifact(str(fold_dir / f"predictions_{name}.csv"), f"fold-{fold}")
            if info.task == "classification":
                figure = confusion_matrix_figure(metrics[name]["confusion_matrix"], info.classes,
                                                 title=f"{info.name} fold {fold} ({name} epoch)")
                path = save_figure(figure, out / "plots" / f"confusion_fold{fold}_{name}.png")
                mlflow.log_artifact(str(path), "plots")


def stage_report(params: Params) -> str:
    """reports/: the results table next to the published figures, the face statistics and contact sheets, and
    every dataset's plots (pipeline/report.py), all logged to the report run."""
    out = work_root() / "reports"
    with tracking.start_stage_run("report", params, experiment=params.experiment, run_name="report",
                                  tags={"variant": params.variant}):
        report = write_report(params.datasets, runs_dir(), out, data=work_root() / "data")
        for name in ("results.md", "results.json"):
            mlflow.log_artifact(str(out / name))
        tracking.log_table(report["rows"], "results.csv")
        for folder in ("plots", "curves"):
            mlflow.log_artifacts(str(out / folder), folder)
        tracking.log_metrics({f"{r['dataset']}/{r['metric']}": r["best_mean"] for r in report["rows"]
                              if r["best_mean"] is not None})
    return report["markdown"]
