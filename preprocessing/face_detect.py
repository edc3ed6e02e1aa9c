"""Face detection on video frames: mediapipe BlazeFace (Tasks API), short range first, then full range on tiles.

Per examined frame the detector tries, in order, until one pass finds a face (inside the clip's region hint,
when it has one):

1. short range on the whole frame (128x128 input: faces that fill a good part of the frame);
2. full range (192x192 input, trained for farther faces) on square tiles of its input size: one tile around
   each face of the previous examined frame, or, when there is none, a grid of tiles overlapping by half that
   covers the frame (on every ``GRID_EVERY``-th examined frame only: a clip without any face costs one grid
   scan per ``GRID_EVERY`` frames, not one per frame).

Each model resamples its input to its fixed size, keeping the aspect ratio, so what decides whether a face is
found is its size relative to the image the model is given. On a whole 1280x720 frame neither model finds a
24-32 px face; full range on the whole frame returns, if anything, boxes two to three times too large at scores
near 0.5; full range on 192-pixel tiles of the decoded frame (854x480: the face is then 16-21 px) finds it with
the box on the face (benchmarks/README.md, "Small faces"). Frames where short range finds the face, as in
close-up footage, cost what they did before the tile pass existed.

A detection row is (12,): the geometry columns of ``face.py`` (frame pixels), the detector score, and which
pass found it (``DETECTOR``: index into ``DETECTORS``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from preprocessing.face import X0, X1, Y0, Y1
from preprocessing.face_model import ensure_face_models
from preprocessing.settings import PreprocessSettings

os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's native logging: errors only

SCORE, DETECTOR = 10, 11  # columns of a detection row after the geometry
ROW_SIZE = 12
DETECTORS = ("short_range", "full_range_tiles")  # DETECTOR column value -> name
SHORT_RANGE, FULL_RANGE_TILES = range(2)
TILE_SIDE = 192      # pixels: the full-range model's input size, so tiles reach it unscaled
GRID_EVERY = 5       # examined frames between two grid scans while no face is being followed
NMS_IOU = 0.3        # tile detections overlapping a higher-scored one by more than this are the same face

Region = tuple[float, float, float, float]  # (x0, y0, x1, y1), fractions of the frame's width and height


class FaceDetector:
    """The BlazeFace passes on RGB frames; one instance per worker process.

    ``models`` maps model names to ``.tflite`` paths (``face_model.ensure_face_models``). With
    ``full_range=False`` only the short-range pass runs (the detection of earlier versions). Frames whose long
    side exceeds ``detect_long_side`` are downscaled for the short-range pass.
    """

    def __init__(self, models: Mapping[str, str | os.PathLike], *, min_confidence: float = 0.5,
                 detect_long_side: int = 1280, full_range: bool = True):
        self._short = _create(models["short_range"], min_confidence)
        self._full = _create(models["full_range"], min_confidence) if full_range else None
        self.detect_long_side = detect_long_side

    @classmethod
    def from_settings(cls, settings: PreprocessSettings) -> FaceDetector:
        """The detector a ``PreprocessSettings`` describes, its models fetched if needed."""
        models = ensure_face_models(settings.face_models)
        return cls(models, min_confidence=settings.min_detection_confidence,
                   detect_long_side=settings.detect_long_side,
                   full_range=settings.face_detection == "short_then_full_range")

    def detect(self, frame: np.ndarray, *, near: np.ndarray | None = None, grid: bool = True,
               region: Region | None = None) -> np.ndarray:
        """frame: (H, W, 3) uint8 RGB. Returns (faces, 12) detection rows of the first pass that finds a face.

        near: (k, 12) rows of the previous examined frame: the tiles go around them. grid: whether a grid scan
        may run when ``near`` is empty. region: a pass counts as finding a face only if a face's centre lies
        inside it (the other faces it found are still returned, with those of the next pass).
        """
        found = self._short_range(frame)
        if self._full is None or _any_inside(found, region, frame.shape):
            return found
        if near is not None and len(near):
            tiles = [_tile_around(row, frame.shape) for row in near]
        else:
            tiles = grid_tiles(frame.shape) if grid else []
        tiled = [self._on_tile(frame, tile) for tile in tiles]
        return suppress_overlaps(np.concatenate([found, *tiled])) if tiles else found

    def _short_range(self, frame: np.ndarray) -> np.ndarray:
        height, width = frame.shape[:2]
        scale = min(1.0, self.detect_long_side / max(height, width))
        small = frame if scale == 1.0 else cv2.resize(frame, (round(width * scale), round(height * scale)),
                                                      interpolation=cv2.INTER_LINEAR)
        return _run(self._short, small, SHORT_RANGE, offset=(0, 0), scale=scale)

    def _on_tile(self, frame: np.ndarray, tile: tuple[int, int, int]) -> np.ndarray:
        x, y, side = tile
        return _run(self._full, frame[y:y + side, x:x + side], FULL_RANGE_TILES, offset=(x, y), scale=1.0)

    def close(self) -> None:
        for model in (self._short, self._full):
            if model is not None:
                model.close()
        self._short = self._full = None

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def native_logs_hidden() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block: mediapipe's native runtime writes INFO lines there
    that no setting turns off (and the sparse full-range model a warning per tensor when it loads). Python
    exceptions raised in the block still reach the caller."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _create(model_path: str | os.PathLike, min_confidence: float):
    from mediapipe.tasks.python import BaseOptions, vision

    options = vision.FaceDetectorOptions(base_options=BaseOptions(model_asset_path=str(Path(model_path))),
                                         running_mode=vision.RunningMode.IMAGE,
                                         min_detection_confidence=min_confidence)
    with native_logs_hidden():
        return vision.FaceDetector.create_from_options(options)


def _run(model, image: np.ndarray, detector: int, *, offset: tuple[int, int], scale: float) -> np.ndarray:
    """Detections of ``model`` on ``image`` (a scaled frame, or a tile at ``offset``) as (faces, 12) frame rows."""
    import mediapipe as mp

    found = model.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image))).detections
    height, width = image.shape[:2]
    rows = [_detection_row(face, detector, offset, scale, width, height) for face in found]
    return np.array(rows, dtype=np.float32).reshape(-1, ROW_SIZE)


def _detection_row(found, detector: int, offset: tuple[int, int], scale: float, width: int,
                   height: int) -> list[float]:
    """One mediapipe detection as [x0, y0, x1, y1, rex, rey, lex, ley, mx, my, score, detector], frame pixels.

    The box is in pixels of the image given, the keypoints in fractions of it: right eye, left eye, nose, mouth.
    """
    box = found.bounding_box
    dx, dy = offset
    x0, y0 = box.origin_x / scale + dx, box.origin_y / scale + dy
    points = [(p.x * width / scale + dx, p.y * height / scale + dy) for p in found.keypoints]
    return [x0, y0, x0 + box.width / scale, y0 + box.height / scale, *points[0], *points[1], *points[3],
            found.categories[0].score, detector]


def region_pixels(region: Region, shape: Sequence[int]) -> np.ndarray:
    """A region hint in pixels of a frame of ``shape`` (H, W, ...): [x0, y0, x1, y1]."""
    height, width = shape[:2]
    return np.array(region, dtype=np.float32) * [width, height, width, height]


def inside_region(rows: np.ndarray, region: Region | None, shape: Sequence[int]) -> np.ndarray:
    """(faces,) bool: whose box centre lies inside ``region`` (all of them when there is no region)."""
    if region is None:
        return np.ones(len(rows), dtype=bool)
    x0, y0, x1, y1 = region_pixels(region, shape)
    cx, cy = (rows[:, X0] + rows[:, X1]) / 2, (rows[:, Y0] + rows[:, Y1]) / 2
    return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)


def _any_inside(rows: np.ndarray, region: Region | None, shape: Sequence[int]) -> bool:
    return bool(inside_region(rows, region, shape).any())


def tile_side(shape: Sequence[int]) -> int:
    return max(1, min(TILE_SIDE, *shape[:2]))


def grid_tiles(shape: Sequence[int]) -> list[tuple[int, int, int]]:
    """Square tiles (x, y, side) of the full-range input size (or the short side, if smaller), overlapping by half,
    covering a frame of ``shape``."""
    height, width = shape[:2]
    side = tile_side(shape)
    step = max(1, side // 2)
    xs = sorted({*range(0, max(1, width - side + 1), step), max(0, width - side)})
    ys = sorted({*range(0, max(1, height - side + 1), step), max(0, height - side)})
    return [(x, y, side) for y in ys for x in xs]


def _tile_around(row: np.ndarray, shape: Sequence[int]) -> tuple[int, int, int]:
    """The tile (x, y, side) centred on a face box, moved inside the frame."""
    height, width = shape[:2]
    side = tile_side(shape)
    cx, cy = (row[X0] + row[X1]) / 2, (row[Y0] + row[Y1]) / 2
    x = int(np.clip(round(cx - side / 2), 0, max(0, width - side)))
    y = int(np.clip(round(cy - side / 2), 0, max(0, height - side)))
    return x, y, side


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of the boxes of two rows."""
    width = max(0.0, min(a[X1], b[X1]) - max(a[X0], b[X0]))
    height = max(0.0, min(a[Y1], b[Y1]) - max(a[Y0], b[Y0]))
    union = (a[X1] - a[X0]) * (a[Y1] - a[Y0]) + (b[X1] - b[X0]) * (b[Y1] - b[Y0]) - width * height
    return width * height / union if union > 0 else 0.0


def suppress_overlaps(rows: np.ndarray) -> np.ndarray:
    """Keep the best-scored of detections that overlap by more than ``NMS_IOU`` (one face seen by two tiles)."""
    kept: list[np.ndarray] = []
    for row in rows[np.argsort(-rows[:, SCORE])]:
        if all(box_iou(row, other) <= NMS_IOU for other in kept):
            kept.append(row)
    return np.array(kept, dtype=np.float32).reshape(-1, ROW_SIZE)


def examined_frames(count: int, every: int) -> Iterator[int]:
    """Frames 0, every, 2 * every, ... and the last one (so the track's end is interpolated, not held)."""
    return (t for t in range(count) if t % every == 0 or t == count - 1)


def detect_frames(detector: FaceDetector, frames: np.ndarray, every: int = 1,
                  region: Region | None = None) -> list[np.ndarray | None]:
    """Detections on the examined frames (``examined_frames``); None for the frames skipped.

    frames: (T, H, W, 3) uint8 RGB. Tiles follow the faces of the previous examined frame; without any, a grid
    scan may run on every ``GRID_EVERY``-th examined frame, the first included. Returns per frame
    (faces, 12) rows as ``FaceDetector.detect``, or None.
    """
    detections: list[np.ndarray | None] = [None] * len(frames)
    previous = None
    for n, t in enumerate(examined_frames(len(frames), every)):
        rows = detector.detect(frames[t], near=previous, grid=n % GRID_EVERY == 0, region=region)
        detections[t], previous = rows, rows
    return detections
