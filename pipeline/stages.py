"""The pipeline stages as functions: what ``dvc.yaml`` runs through the CLI, each tracked in MLflow.

Layout (under the project root, or ``$HICMAE_WORKDIR`` when set):
    data/<dataset>/manifest.jsonl     adapter output
    data/<dataset>/processed/         shards/, status.jsonl, summary.json
    runs/pretrain/                    checkpoint.pt, metrics.json
    runs/<dataset>/finetune/          fold-k/{test_metrics.json, predictions_*.csv}, plots/
    runs/<dataset>/metrics.json       fold mean and std of the test metrics (last and best epoch)
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
                                  run_name=f"preprocess-{dataset}", tags={"dataset": dataset}):
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
                                  tags={"dataset": dataset}) as run:
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
    with tracking.start_stage_run("finetune", settings, experiment=params.experiment, run_name=f"finetune-{dataset}",
                                  data_hash=tracking.hash_directory(processed),
                                  tags={"dataset": dataset, "protocol": settings.protocol}) as parent:
        fold_runs: dict[int, tracking.RunLogger] = {}

        def fold_logger(fold: int) -> tracking.RunLogger:
            fold_runs[fold] = tracking.start_child_run(parent, f"{dataset}-fold{fold}", {
                "fold": str(fold), "dataset": dataset, "dvc_stage": "finetune"})
            return fold_runs[fold]

        try:
            summary = run_finetune(params, settings, manifest, processed, out, init, tracker_for_fold=fold_logger,
                                   storage=work_root() / "ray_results")
        except BaseException:
            for run in fold_runs.values():
                run.finish(status="FAILED")
            raise
        for fold, run in fold_runs.items():
            test = json.loads((out / f"fold-{fold}" / "test_metrics.json").read_text())
            run.finish({"test": test["best"], "test_last": test["last"]})
        write_json(runs_dir(dataset, "metrics.json"), summary)
        tracking.log_metrics({"test": summary["best"], "test_last": summary["last"]})
        _log_fold_artifacts(out, summary, info)
    return summary


def _log_fold_artifacts(out: Path, summary: dict, info) -> None:
    """Confusion-matrix plots and per-clip predictions of every fold into the parent run."""
    for fold in summary["folds"]:
        fold_dir = out / f"fold-{fold}"
        metrics = json.loads((fold_dir / "test_metrics.json").read_text())
        for name in ("best", "last"):
            mlflow.log_artifact(str(fold_dir / f"predictions_{name}.csv"), f"fold-{fold}")
            if info.task == "classification":
                figure = confusion_matrix_figure(metrics[name]["confusion_matrix"], info.classes,
                                                 title=f"{info.name} fold {fold} ({name} epoch)")
                path = save_figure(figure, out / "plots" / f"confusion_fold{fold}_{name}.png")
                mlflow.log_artifact(str(path), "plots")


# HiCMAE-B audio-visual fold means reported by the paper (percent), for the results table.
PAPER_RESULTS = {
    "crema-d": {"uar": 84.91, "war": 84.89}, "mafw": {"uar": 42.65, "war": 56.17}, "ravdess": {"war": 87.99},
    "msp-improv": {"war": 74.95}, "iemocap": {"war": 68.36, "uar": 68.21}, "dfew": {"war": 75.01},
    "werewolf-xl": {"pcc_mean": (69.23 + 33.74 + 40.66) / 3, "ccc_mean": (64.81 + 31.85 + 37.54) / 3},
}
REPORTED = ("uar", "war", "f1_weighted", "ccc_mean", "pcc_mean")


def stage_report(params: Params) -> str:
    """reports/results.{md,json}: fold-mean test metrics (best and last epoch) next to the paper's."""
    rows = []
    for dataset in params.datasets:
        summary = json.loads(runs_dir(dataset, "metrics.json").read_text())
        for metric in REPORTED:
            if f"{metric}_mean" not in summary["best"]:
                continue
            rows.append({"dataset": dataset, "metric": metric, "folds": len(summary["folds"]),
                         "best_mean": 100 * summary["best"][f"{metric}_mean"],
                         "best_std": 100 * summary["best"][f"{metric}_std"],
                         "last_mean": 100 * summary["last"][f"{metric}_mean"],
                         "paper": PAPER_RESULTS.get(dataset, {}).get(metric)})
    lines = ["| dataset | metric | folds | best epoch (mean ± std) | last epoch | paper (HiCMAE-B) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        paper = f"{r['paper']:.2f}" if r["paper"] is not None else "—"
        lines.append(f"| {r['dataset']} | {r['metric']} | {r['folds']} | {r['best_mean']:.2f} ± {r['best_std']:.2f} "
                     f"| {r['last_mean']:.2f} | {paper} |")
    table = "\n".join(lines) + "\n"
    out = work_root() / "reports"
    out.mkdir(exist_ok=True)
    (out / "results.md").write_text(table)
    nested = {r["dataset"]: {} for r in rows}
    for r in rows:
        nested[r["dataset"]][r["metric"]] = {k: r[k] for k in ("best_mean", "best_std", "last_mean", "paper")}
    write_json(out / "results.json", nested)
    with tracking.start_stage_run("report", params, experiment=params.experiment, run_name="report"):
        mlflow.log_artifact(str(out / "results.md"))
        tracking.log_table(rows, "results.csv")
    return table
