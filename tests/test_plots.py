"""Figures render to PNG files of the expected size."""

import numpy as np
import pytest
from matplotlib.image import imread

from pipeline.plots import (
    DPI,
    as_history,
    confusion_matrix_figure,
    embedding_maps_figure,
    project_2d,
    save_figure,
    training_curves_figure,
)

CLASSES = ["anger", "disgust", "fear", "happiness", "neutral", "sadness"]


def saved_image(fig, path):
    """Save ``fig`` and return the PNG read back (H, W, channels); checks the file is a real image."""
    save_figure(fig, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000
    return imread(path)


def expected_size(fig):
    width, height = fig.get_size_inches()
    return round(height * DPI), round(width * DPI)


def test_confusion_matrix_png(tmp_path):
    cm = np.diag([5, 4, 3, 6, 2, 7]) + 1
    fig = confusion_matrix_figure(cm, CLASSES, title="CREMA-D fold 1")
    image = saved_image(fig, tmp_path / "cm.png")
    assert image.shape[:2] == expected_size(fig)
    assert image.shape[:2] == (560, 560)  # 0.6 in per class + 2 in, at 100 dpi
    assert image[..., :3].std() > 0.1  # not a blank canvas
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed away


def test_normalized_cells_show_row_percentages():
    fig = confusion_matrix_figure([[3, 1], [0, 0]], ["a", "b"])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["75.0", "25.0", "0.0", "0.0"]  # an empty row stays 0, not NaN
    counts = confusion_matrix_figure([[3, 1], [0, 0]], ["a", "b"], normalize=False)
    assert [t.get_text() for t in counts.axes[0].texts] == ["3", "1", "0", "0"]


def test_history_from_epoch_dicts():
    history = as_history([{"epoch": 0, "train/loss": 1.0}, {"epoch": 1, "train/loss": 0.5, "val/uar": 0.4}])
    assert history["train/loss"] == [1.0, 0.5]
    assert np.isnan(history["val/uar"][0]) and history["val/uar"][1] == 0.4


def test_training_curves_png(tmp_path):
    epochs = [{"epoch": e, "train/loss": 2 / (e + 1), "val/loss": 2.2 / (e + 1), "val/uar": 0.1 * e, "lr": 1e-3}
              for e in range(6)]
    fig = training_curves_figure(epochs)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "uar", "lr"]
    assert len(fig.axes[0].lines) == 2  # train and val loss share a panel
    image = saved_image(fig, tmp_path / "curves.png")
    assert image.shape[:2] == expected_size(fig) == (300, 1200)


@pytest.mark.parametrize("num_points, method", [(40, "tsne"), (5, "tsne"), (40, "pca")])
def test_embedding_png(tmp_path, num_points, method):
    rng = np.random.default_rng(0)
    labels = np.arange(num_points) % 3
    embeddings = rng.normal(size=(num_points, 16)) + 5 * labels[:, None]
    fig = embedding_maps_figure({"Clip embeddings": embeddings}, labels, CLASSES[:3], method=method)
    used = "t-SNE" if method == "tsne" and num_points >= 8 else "PCA"
    assert used in fig.axes[0].get_title()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == CLASSES[:3]
    image = saved_image(fig, tmp_path / "embedding.png")
    assert image.shape[:2] == (500, 600)


def test_embedding_maps_one_panel_per_embedding_coloured_by_a_continuous_value(tmp_path):
    rng = np.random.default_rng(2)
    values = np.linspace(-1, 1, 12)  # e.g. the valence of 12 clips
    maps = {"video": rng.normal(size=(12, 8)), "audio": rng.normal(size=(12, 4)), "fused": rng.normal(size=(12, 16))}
    fig = embedding_maps_figure(maps, values, None, value_name="valence", title="werewolf-xl")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [f"{name} (t-SNE, 12 clips)" for name in maps]
    colour_bars = [ax for ax in fig.axes if not ax.get_title()]
    assert [ax.get_ylabel() for ax in colour_bars] == ["valence"] * 3
    np.testing.assert_allclose(panels[0].collections[0].get_array(), values)  # colours follow the values
    assert saved_image(fig, tmp_path / "maps.png").shape[:2] == (500, 1800)
    with pytest.raises(ValueError, match="video: 12 embeddings but 11 labels"):
        embedding_maps_figure(maps, values[:11], None)


def test_projection_is_deterministic_and_separates_classes():
    rng = np.random.default_rng(1)
    labels = np.arange(30) % 2
    embeddings = rng.normal(size=(30, 8)) + 10 * labels[:, None]
    first, second = project_2d(embeddings, seed=0), project_2d(embeddings, seed=0)
    np.testing.assert_array_equal(first, second)
    centre_gap = np.linalg.norm(first[labels == 0].mean(0) - first[labels == 1].mean(0))
    spread = first[labels == 0].std(0).mean()
    assert centre_gap > 2 * spread


def test_save_figure_replaces_existing_file(tmp_path):
    path = tmp_path / "plots" / "cm.png"
    path.parent.mkdir()
    path.write_bytes(b"old")
    save_figure(confusion_matrix_figure(np.eye(2), ["a", "b"]), path)
    assert path.read_bytes()[:4] == b"\x89PNG"
