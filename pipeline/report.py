"""The report stage: fold-mean test metrics next to published figures, and the plots of every run.

Reads what the training stages wrote (``runs/<dataset>/metrics.json``, ``runs/<dataset>/finetune/info.json`` and
``fold-k/{history.csv, embeddings_best.npz}``, ``runs/pretrain/history.csv``) and what preprocessing wrote
(``data/<dataset>/processed/{summary.json, status.jsonl, shards/}``), and writes, under ``reports/``:

    results.md, results.json              per dataset and metric: our fold mean ± std (best and last epoch, %)
                                          next to HiCMAE-B's published figures and AVF-MAE++'s
    plots/<dataset>/confusion.png         test confusion matrix summed over folds, best epoch (classification)
    plots/<dataset>/embeddings.png        t-SNE of the video, audio and fused clip embeddings of every fold's test
                                          clips (best epoch), coloured by class or by the first target
    plots/<dataset>/curves.png            training loss and validation metrics of every fold, per epoch
    plots/<dataset>/faces.png             contact sheet: face crops of clips drawn at random (seeded) from the
                                          preprocessed shards, beside the face statistics of their summary.json
    plots/pretrain/curves.png             pre-training losses and learning rate per epoch
    curves/finetune/<dataset>/fold-k.csv  epoch, train/loss, val/score (the epoch-selection metric): DVC plots
    curves/pretrain.csv                   the pre-training history: DVC plots
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path

import mlflow
import numpy as np

from preprocessing.fileio import atomic_write_bytes, atomic_write_text, write_json

from . import tracking
from .config.params import DataParams
from .console import current
from .face_report import face_markdown, face_sheet, read_face_summary
from .history import history_csv, read_history
from .layout import FinetuneRun, Layout, PretrainRun, require, shown
from .plots import confusion_matrix_figure, embedding_maps_figure, save_figure, training_curves_figure

MAX_EMBEDDING_POINTS = 5000         # t-SNE cost grows with N: larger test sets are subsampled (fixed seed)

# Metrics of the results table, in this order, where a run has them; per-target correlations follow.
REPORTED = ("uar", "war", "f1_weighted", "ccc_mean", "pcc_mean")
# Validation metrics drawn in a dataset's training curves.
CURVE_METRICS = {"classification": ("uar", "war"), "regression": ("ccc_mean", "pcc_mean")}
PRETRAIN_CURVES = ("train/loss", "train/loss_video", "train/loss_audio", "train/loss_contrastive", "lr")

# Audio-visual fold means (percent) of HiCMAE-B (Sun et al., Information Fusion 2024, Tables 2, 4, 6 and 8-12).
# The Werewolf-XL means are ours, from the per-dimension figures; AVCAffe is scored there as one classification
# task per dimension (weighted F1), which this pipeline's regression runs do not compute.
HICMAE_B = {
    "crema-d": {"uar": 84.91, "war": 84.89},
    "mafw": {"uar": 42.65, "war": 56.17},
    "dfew": {"war": 75.01},
    "ravdess": {"war": 87.99},
    "msp-improv": {"war": 74.95},
    "iemocap": {"uar": 68.21, "war": 68.36},
    "werewolf-xl": {"pcc/valence": 69.23, "ccc/valence": 64.81, "pcc/arousal": 33.74, "ccc/arousal": 31.85,
                    "pcc/dominance": 40.66, "ccc/dominance": 37.54,
                    "pcc_mean": round((69.23 + 33.74 + 40.66) / 3, 2),
                    "ccc_mean": round((64.81 + 31.85 + 37.54) / 3, 2)},
    "avcaffe": {"f1_weighted/arousal": 43.18, "f1_weighted/valence": 44.20},
}
# The strongest successor: AVF-MAE++ (Wu et al., CVPR 2025), audio-visual fold means (percent).
AVF_MAE_PP = {
    "crema-d": {"uar": 86.02, "war": 85.95},
    "mafw": {"uar": 46.05, "war": 60.24},
    "dfew": {"uar": 66.88, "war": 77.45},
}
# Column key -> (column title, figures per dataset and metric).
REFERENCES = {"hicmae_b": ("HiCMAE-B (paper)", HICMAE_B), "avf_mae_pp": ("AVF-MAE++ (CVPR 2025)", AVF_MAE_PP)}


def read_json(path: Path, hint: str) -> dict:
    """A JSON file written by an earlier stage; a missing file names the stage to run."""
    return json.loads(require(path, hint).read_text())


def read_embeddings(paths: Iterable[Path]) -> dict[str, np.ndarray]:
    """The folds' ``embeddings_best.npz`` concatenated: ``clip_id``, ``truth`` and each (N, C) embedding."""
    parts = []
    for path in paths:
        with np.load(path) as npz:
            parts.append({name: npz[name] for name in npz.files})
    names = list(parts[0])
    if any(list(part) != names for part in parts):
        raise ValueError(f"the folds' embedding files hold different arrays: {[list(p) for p in parts]}")
    return {name: np.concatenate([part[name] for part in parts]) for name in names}


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def table_rows(dataset: str, summary: dict) -> list[dict]:
    """One row per metric: our fold mean and std (percent) at the best and the last epoch, and the published
    figures (None where a source has none)."""
    best, last = summary["best"], summary["last"]
    ours = [metric for metric in REPORTED if f"{metric}_mean" in best]
    ours += [name.removesuffix("_mean") for name in best
             if name.endswith("_mean") and name.split("/", 1)[0] in ("pcc", "ccc") and "/" in name]
    published = [metric for _, figures in REFERENCES.values() for metric in figures.get(dataset, {})]
    rows = []
    for metric in dict.fromkeys(ours + published):
        row = {"dataset": dataset, "metric": metric, "folds": len(summary["folds"])}
        for epoch, values in (("best", best), ("last", last)):
            row[f"{epoch}_mean"] = _percent(values.get(f"{metric}_mean"))
            row[f"{epoch}_std"] = _percent(values.get(f"{metric}_std"))
        row.update({key: figures.get(dataset, {}).get(metric) for key, (_, figures) in REFERENCES.items()})
        rows.append(row)
    return rows


def _cell(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def results_markdown(rows: list[dict], plots: dict[str, list[Path]], out: Path,
                     faces: dict[str, dict] | None = None) -> str:
    """The results table, what its columns mean, the face statistics, and links to the plots (relative to
    ``out``)."""
    titles = [title for title, _ in REFERENCES.values()]
    lines = ["# Results", "",
             f"| dataset | metric | folds | ours, best epoch | ours, last epoch | {' | '.join(titles)} |",
             "|---|---|---|---|---|" + "---|" * len(titles)]
    for r in rows:
        published = " | ".join(_cell(r[key]) for key in REFERENCES)
        lines.append(f"| {r['dataset']} | {r['metric']} | {r['folds']} | {_cell(r['best_mean'], r['best_std'])} "
                     f"| {_cell(r['last_mean'], r['last_std'])} | {published} |")
    lines += ["", "Ours: test-fold mean ± standard deviation over the folds (percent); the best epoch is chosen on "
              "the validation split (clean protocol) or on the test fold (`protocol: reference`). Published: "
              "audio-visual fold means of HiCMAE-B (Sun et al. 2024) and AVF-MAE++ (Wu et al., CVPR 2025).", ""]
    if faces:
        lines += face_markdown(faces)
    for name, paths in plots.items():
        if paths:
            lines += [f"## {name}", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in paths] + [""]
    return "\n".join(lines)


def results_json(rows: list[dict]) -> dict:
    """``{dataset: {metric: {folds, best_mean, best_std, last_mean, last_std, hicmae_b, avf_mae_pp}}}``."""
    nested: dict[str, dict] = {}
    for r in rows:
        values = {k: v for k, v in r.items() if k not in ("dataset", "metric")}
        nested.setdefault(r["dataset"], {})[r["metric"]] = values
    return nested


def _subsample(count: int, limit: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``limit`` of ``count`` items, sorted (all of them when ``count <= limit``)."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, limit, replace=False))


def _fold_files(run: FinetuneRun, folds: list[int], file: str, dataset: str) -> list[Path]:
    """``file`` (an attribute of ``layout.FoldRun``) of every fold; one error naming the missing ones."""
    paths = [getattr(run.fold(fold), file) for fold in folds]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)}: missing; re-run `hicmae finetune --dataset {dataset}`")
    return paths


def dataset_plots(dataset: str, summary: dict, run: FinetuneRun, out: Path,
                  max_points: int = MAX_EMBEDDING_POINTS) -> list[Path]:
    """The confusion matrix, embedding maps and training curves of one dataset's folds; their PNG paths.

    Also writes the per-fold curve CSVs under ``out/curves/finetune/<dataset>/``.
    """
    described = read_json(run.info, f"re-run `hicmae finetune --dataset {dataset}`")
    info, selection = described["dataset"], described["selection_metric"]
    folds, plots = summary["folds"], out / "plots" / dataset
    written = []
    if info["task"] == "classification":
        figure = confusion_matrix_figure(summary["best"]["confusion_matrix"], info["classes"],
                                         title=f"{dataset}: test clips of {len(folds)} folds, best epoch")
        written.append(save_figure(figure, plots / "confusion.png"))

    embeddings = read_embeddings(_fold_files(run, folds, "embeddings", dataset))
    chosen = _subsample(len(embeddings["clip_id"]), max_points)
    names = {"video": "video", "audio": "audio", "fused": "audio-visual (fused)"}
    maps = {title: embeddings[key][chosen] for key, title in names.items() if key in embeddings}
    truth = embeddings["truth"][chosen]
    current().detail(f"report: {dataset}: t-SNE of {len(chosen)} test clips, {len(maps)} embeddings")
    if info["task"] == "classification":
        figure = embedding_maps_figure(maps, truth, info["classes"],
                                       title=f"{dataset}: test-clip embeddings (best epoch) by class")
    else:
        target = info["targets"][0]
        figure = embedding_maps_figure(maps, truth.reshape(len(truth), -1)[:, 0], None, value_name=target,
                                       title=f"{dataset}: test-clip embeddings (best epoch) by {target}")
    written.append(save_figure(figure, plots / "embeddings.png"))

    histories = {fold: read_history(path) for fold, path in
                 zip(folds, _fold_files(run, folds, "history", dataset), strict=True)}
    shown = ["train/loss"] + [f"val/{metric}" for metric in CURVE_METRICS[info["task"]]]
    by_epoch: dict[float, dict] = {}
    for fold, history in histories.items():
        for row in history:
            merged = by_epoch.setdefault(row["epoch"], {"epoch": row["epoch"]})
            merged.update({f"fold-{fold}/{name}": row[name] for name in shown if name in row})
        curve = [{"epoch": int(row["epoch"]), "train/loss": row.get("train/loss", math.nan),
                  "val/score": row.get(f"val/{selection}", math.nan)} for row in history]
        atomic_write_bytes(out / "curves" / "finetune" / dataset / f"fold-{fold}.csv", history_csv(curve))
    figure = training_curves_figure([by_epoch[e] for e in sorted(by_epoch)],
                                    title=f"{dataset}: fine-tuning per fold (best epoch chosen by val {selection})")
    written.append(save_figure(figure, plots / "curves.png"))
    return written


def pretrain_plots(run: PretrainRun, out: Path) -> list[Path]:
    """The pre-training curves (PNG and a copy of the history CSV); nothing when no history was written."""
    if not run.history.is_file():
        current().show(f"report: {shown(run.history)} not found: no pre-training curves")
        return []
    history = read_history(run.history)
    atomic_write_bytes(out / "curves" / "pretrain.csv", run.history.read_bytes())
    curves = [{name: row[name] for name in ("epoch", *PRETRAIN_CURVES) if name in row} for row in history]
    figure = training_curves_figure(curves, title="Pre-training")
    return [save_figure(figure, out / "plots" / "pretrain" / "curves.png")]


def write_report(datasets: Iterable[str], layout: Layout) -> dict:
    """Tables, plots and curve CSVs of ``datasets`` (fine-tuned under runs/, preprocessed under data/) and of
    pre-training, in ``layout.reports``.

    Returns ``{"rows": table rows, "markdown": results.md's text, "plots": {section: PNG paths}, "faces":
    {dataset: face statistics}}``.
    """
    out = layout.reports
    for folder in ("plots", "curves"):  # no stale figures of datasets no longer listed
        shutil.rmtree(out / folder, ignore_errors=True)
        (out / folder).mkdir(parents=True)
    rows, plots, faces = [], {}, {}
    for dataset in datasets:
        run = layout.finetune(dataset)
        summary = read_json(run.metrics, f"run `hicmae finetune --dataset {dataset}` first")
        rows += table_rows(dataset, summary)
        plots[dataset] = dataset_plots(dataset, summary, run, out)
        processed = layout.data(dataset).processed
        face = read_face_summary(processed)
        if face is not None:
            faces[dataset] = face
            plots[dataset].append(face_sheet(dataset, processed, out))
    plots["pre-training"] = pretrain_plots(layout.pretrain, out)
    markdown = results_markdown(rows, plots, out, faces)
    atomic_write_text(out / "results.md", markdown)
    write_json(out / "results.json", results_json(rows))
    return {"rows": rows, "markdown": markdown, "plots": plots, "faces": faces}


def stage_report(params: DataParams) -> str:
    """``hicmae report``: reports/ for every dataset in params.yaml, all logged to the MLflow run ``report``; its
    inputs are the fold summaries it read (``runs/<dataset>/metrics.json``, their sha256 the digest)."""
    layout = Layout.current()
    out = layout.reports
    with tracking.start_stage_run("report", params, experiment=params.experiment, run_name="report",
                                  tags={"variant": params.variant}) as run:
        report = write_report(params.datasets, layout)
        tracking.log_inputs(run.info.run_id, [tracking.file_input(f"{name}-results", layout.finetune(name).metrics,
                                                                  "report") for name in params.datasets])
        for name in ("results.md", "results.json"):
            mlflow.log_artifact(str(out / name))
        tracking.log_table(report["rows"], "results.csv")
        for folder in ("plots", "curves"):
            mlflow.log_artifacts(str(out / folder), folder)
        tracking.log_metrics({f"{r['dataset']}/{r['metric']}": r["best_mean"] for r in report["rows"]
                              if r["best_mean"] is not None})
    for line in first_table(report["markdown"]):
        current().show(line)
    current().show(f"report: -> {shown(out / 'results.md')}, {shown(out)}/plots/")
    return report["markdown"]


def first_table(markdown: str) -> list[str]:
    """The rows of the first Markdown table in ``markdown`` (header included, separator left out)."""
    rows = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                rows.append(line)
        elif rows:
            break
    return rows
