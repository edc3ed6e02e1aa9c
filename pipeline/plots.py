"""Figures for runs and reports: confusion matrix, training curves, 2-D embedding maps, face-crop contact sheets;
atomic PNG writing.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, rendered by the Agg backend), so they are
safe in worker processes and are freed when dropped. ``save_figure`` writes one as a PNG (then
``mlflow.log_artifact`` logs the file).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from preprocessing.fileio import atomic_path

DPI = 100
SMALL_TSNE = 1000  # points: t-SNE below this size runs on one thread


def confusion_matrix_figure(cm, class_names: Sequence[str], normalize: bool = True,
                            title: str = "Confusion matrix") -> Figure:
    """Heat map of a C x C confusion matrix (rows = true class); ``normalize`` shows row percentages."""
    cm = np.asarray(cm, dtype=np.float64)
    if normalize:
        totals = cm.sum(axis=1, keepdims=True)
        cm = 100 * np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
    size = max(4.0, 0.6 * len(class_names) + 2.0)
    fig = Figure(figsize=(size, size), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=100 if normalize else max(cm.max(), 1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of true class" if normalize else "clips")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = (100 if normalize else cm.max()) / 2
    for (row, col), value in np.ndenumerate(cm):
        text = f"{value:.1f}" if normalize else f"{value:.0f}"
        ax.text(col, row, text, ha="center", va="center", fontsize=8,
                color="white" if value > threshold else "black")
    return fig


def as_history(history) -> dict[str, list[float]]:
    """A training history as ``{name: per-epoch values}`` from that form or from a list of per-epoch dicts.

    Missing and non-numeric entries become NaN, so every curve has one value per epoch.
    """
    if isinstance(history, Mapping):
        return {name: [_number(v) for v in values] for name, values in history.items()}
    names = list(dict.fromkeys(name for epoch in history for name in epoch))
    return {name: [_number(epoch.get(name)) for epoch in history] for name in names}


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def training_curves_figure(history, x: str = "epoch", title: str = "Training curves") -> Figure:
    """One panel per metric name, one line per split: ``train/loss`` and ``val/loss`` share the "loss" panel.

    ``history`` is ``{name: values}`` or a list of per-epoch dicts; the entry ``x`` (if present) is the x axis.
    """
    curves = as_history(history)
    length = max((len(values) for values in curves.values()), default=0)
    steps = curves.pop(x, list(range(length)))
    panels: dict[str, list[str]] = {}
    for name, values in curves.items():
        if not np.all(np.isnan(values)):
            panels.setdefault(name.rsplit("/", 1)[-1], []).append(name)
    columns = min(3, max(1, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    fig = Figure(figsize=(4.0 * columns, 3.0 * rows), dpi=DPI, layout="constrained")
    fig.suptitle(title)
    for index, (panel, names) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(rows, columns, index)
        for name in names:
            ax.plot(steps[:len(curves[name])], curves[name], marker="o", markersize=3, label=name)
        ax.set_title(panel)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def projection_method(num_points: int, dim: int, method: str = "tsne") -> str:
    """The method ``project_2d`` uses: ``method``, except PCA for fewer than 8 points or fewer than 3 dims."""
    if method not in ("tsne", "pca"):
        raise ValueError(f"unknown method {method!r}; expected 'tsne' or 'pca'")
    return "pca" if num_points < 8 or dim < 3 else method


def project_2d(embeddings, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) by t-SNE (fixed seed, perplexity clipped for small N) or PCA (see ``projection_method``)."""
    points = np.asarray(embeddings, dtype=np.float64).reshape(len(embeddings), -1)
    method = projection_method(*points.shape, method)
    if points.shape[1] < 2:
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    if len(points) < 2:
        return np.zeros((len(points), 2))
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(points)
    perplexity = min(30.0, (len(points) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    # OpenMP threads cost more than they save on small maps (many times more on a busy machine).
    with threadpool_limits(1 if len(points) < SMALL_TSNE else None, user_api="openmp"):
        return tsne.fit_transform(points)


def embedding_maps_figure(maps: Mapping[str, np.ndarray], labels, class_names: Sequence[str] | None,
                          method: str = "tsne", seed: int = 0, title: str | None = None,
                          value_name: str = "value") -> Figure:
    """One scatter panel per named (N, D) embedding array of the same N clips, each projected to 2-D.

    Points are coloured by ``labels``: integer class labels with a legend naming ``class_names``, or, with
    ``class_names=None``, continuous values (N,) with a colour bar named ``value_name``. Each panel's title
    says the projection used (see ``projection_method``) and the number of clips.
    """
    labels = np.asarray(labels).reshape(-1)
    fig = Figure(figsize=(6.0 * len(maps), 5.0), dpi=DPI, layout="constrained")
    if title:
        fig.suptitle(title)
    for index, (name, embeddings) in enumerate(maps.items(), start=1):
        embeddings = np.asarray(embeddings, dtype=np.float64).reshape(len(embeddings), -1)  # (N, D)
        if len(embeddings) != len(labels):
            raise ValueError(f"{name}: {len(embeddings)} embeddings but {len(labels)} labels")
        ax = fig.add_subplot(1, len(maps), index)
        _scatter(fig, ax, project_2d(embeddings, method, seed), labels, class_names, value_name)
        used = {"tsne": "t-SNE", "pca": "PCA"}[projection_method(*embeddings.shape, method)]
        ax.set_title(f"{name} ({used}, {len(embeddings)} clips)")
    return fig


def _scatter(fig: Figure, ax, points: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None,
             value_name: str) -> None:
    """(N, 2) points on ``ax``: one colour per class with a legend, or a colour map with a colour bar."""
    if class_names is None:
        image = ax.scatter(points[:, 0], points[:, 1], s=12, c=labels.astype(np.float64), cmap="viridis",
                           alpha=0.8)
        fig.colorbar(image, ax=ax, label=value_name)
    else:
        labels = labels.astype(int)
        colours = _class_colours(len(class_names))
        for index, name in enumerate(class_names):
            chosen = labels == index
            if chosen.any():
                ax.scatter(points[chosen, 0], points[chosen, 1], s=12, color=colours[index], label=name, alpha=0.8)
        ax.legend(fontsize=8, markerscale=1.5, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])


def _class_colours(count: int) -> list:
    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def contact_sheet_figure(strips: Sequence[np.ndarray], labels: Sequence[str], title: str) -> Figure:
    """One row per clip: its crops side by side, its label on the left. strips: (k, H, W, 3) uint8 each."""
    fig = Figure(figsize=(10.0, 0.4 + 1.25 * max(1, len(strips))), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=10)
    for index, (strip, label) in enumerate(zip(strips, labels, strict=True), start=1):
        ax = fig.add_subplot(len(strips), 1, index)
        ax.imshow(np.concatenate(list(strip), axis=1))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (a temporary file in the same folder, then a rename)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)
