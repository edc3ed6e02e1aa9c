"""Previews of a prediction: the video's frames with the face box and the predicted label.

A ``.png`` shows one frame per window (its middle frame) with the box, the window's time span and label, and the
clip's outputs as bars; an ``.mp4`` shows every decoded frame with the box and the label of the nearest window.
The box is green where short range found the face, blue where full range on tiles did, yellow where it was
filled in between detections.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from preprocessing.clip import ClipMedia
from preprocessing.face import X0, X1, Y0, Y1
from preprocessing.fileio import atomic_path

PREVIEW_SUFFIXES = (".png", ".mp4")
PNG_PANELS = 8  # window frames shown in a PNG preview (evenly chosen when there are more windows)
# Face box colour: detected in this frame by short range / by full range on tiles (small faces), or filled in.
BOX_COLOURS = {"short_range": (40, 220, 40), "full_range_tiles": (0, 160, 255), None: (240, 200, 0)}
BOX_LEGEND = {"short_range": "short range", "full_range_tiles": "full range, tiles", None: "filled in"}


def label_text(output: dict) -> str:
    """'happy 71%' for a classification output, 'valence 0.31, arousal -0.12' for a regression one."""
    if "label" in output:
        return f"{output['label']} {output['probabilities'][output['label']]:.0%}"
    return ", ".join(f"{name} {value:.2f}" for name, value in output["values"].items())



def save_preview(path: str | Path, media: ClipMedia, result: dict) -> Path:
    """Write a ``.png`` (window frames with the face box and label, and the clip's outputs as bars) or an
    ``.mp4`` (every frame with the face box and the label of the nearest window)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PREVIEW_SUFFIXES:
        raise ValueError(f"{path}: a preview is written as .png or .mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    return preview_png(path, media, result) if suffix == ".png" else preview_mp4(path, media, result)


def _box(media: ClipMedia, t: int) -> tuple[int, int, int, int]:
    """The face box of frame t in decoded-frame pixels, clipped to the frame: (x0, y0, x1, y1)."""
    height, width = media.video.frames.shape[1:3]
    x0, y0, x1, y1 = media.geometry[t, [X0, Y0, X1, Y1]]
    return (int(np.clip(x0, 0, width - 1)), int(np.clip(y0, 0, height - 1)), int(np.clip(x1, 0, width - 1)),
            int(np.clip(y1, 0, height - 1)))


def preview_png(path: Path, media: ClipMedia, result: dict) -> Path:
    """A grid: one frame per window (its middle frame, face box coloured by the detector that found it, time span
    and label) and a bar chart of the clip-level output."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from ..plots import save_figure

    windows = result["windows"]
    shown = [windows[round(i)] for i in np.linspace(0, len(windows) - 1, min(PNG_PANELS, len(windows)))]
    columns = min(4, len(shown) + 1)
    rows = math.ceil((len(shown) + 1) / columns)
    fig = Figure(figsize=(3 * columns, 3.2 * rows), dpi=100, layout="constrained")
    for i, window in enumerate(shown):
        first, last = window["frames"]
        t = min((first + last) // 2, len(media.video.frames) - 1)
        x0, y0, x1, y1 = _box(media, t)
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(media.video.frames[t])
        detector = result["face"]["track"][t]["detector"]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linewidth=2,
                               edgecolor=np.array(BOX_COLOURS[detector]) / 255))
        ax.set_title(f"{window['start']:.2f}-{window['end']:.2f} s\n{label_text(window)}\n"
                     f"face: {BOX_LEGEND[detector]}", fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(rows, columns, len(shown) + 1)
    clip = result["clip"]
    values = clip.get("probabilities") or clip["values"]
    ax.barh(list(values), list(values.values()), color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("probability" if "probabilities" in clip else "value")
    ax.set_title(f"clip: {label_text(clip)}", fontsize=9)
    return save_figure(fig, path)


def frame_labels(result: dict, num_frames: int) -> list[str]:
    """For every frame, the label text of the window whose centre is nearest to it."""
    centres = np.array([(w["frames"][0] + w["frames"][1]) / 2 for w in result["windows"]])
    texts = [label_text(w) for w in result["windows"]]
    return [texts[int(np.argmin(np.abs(centres - t)))] for t in range(num_frames)]


def draw_frame(frame: np.ndarray, box: tuple[int, int, int, int], colour: tuple[int, int, int],
               text: str) -> np.ndarray:
    """A copy of (H, W, 3) RGB ``frame`` with the face box and ``text`` on a dark band at the top."""
    image = frame.copy()
    height, width = image.shape[:2]
    font = max(0.5, width / 700)  # OpenCV font scale: ~20 px high text per unit
    cv2.rectangle(image, box[:2], box[2:], colour, max(1, round(3 * font)))
    band = round(30 * font)
    image[:band] = (image[:band] * 0.35).astype(np.uint8)
    cv2.putText(image, text, (round(8 * font), round(21 * font)), cv2.FONT_HERSHEY_SIMPLEX, font,
                (255, 255, 255), max(1, round(1.5 * font)), cv2.LINE_AA)
    return image


def preview_mp4(path: Path, media: ClipMedia, result: dict) -> Path:
    """Every decoded frame with the face box (green: found by short range, blue: by full range on tiles, yellow:
    filled in), the window's label and the detector's name, h264."""
    import av

    frames = media.video.frames
    height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2  # yuv420p needs even sides
    labels = frame_labels(result, len(frames))
    track = result["face"]["track"]
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(media.video.fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for t, frame in enumerate(frames):
            detector = track[t]["detector"]
            image = draw_frame(frame[:height, :width], _box(media, t), BOX_COLOURS[detector],
                               f"{labels[t]}  [{BOX_LEGEND[detector]}]")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path
