"""Face detection, tracking and alignment: video frames in, 160x160 aligned face crops out.

Every frame (or every ``detect_every``-th) goes through mediapipe's BlazeFace detector (Tasks API). The
main face track is the one with the most face area summed over time (large and present in many frames);
frames where it is missing are filled by interpolating its neighbours; boxes and eye/mouth keypoints are
smoothed over time. Each frame is then rotated so the eyes are level and cropped to a square around the
face, framed like OpenFace's similarity-aligned crops (``-simscale 0.7``: the face fills most of the crop
with a small margin), and resized to 160x160.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import uniform_filter1d

os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's native logging: errors only

# Columns of a face geometry row: box corners, the subject's right and left eye, the mouth centre.
X0, Y0, X1, Y1, REX, REY, LEX, LEY, MX, MY = range(10)
CROP_SIZE = 160
FACE_TO_CROP = 1.45  # crop side / detector box side: the face fills ~70% of the crop, as OpenFace's 0.7
CENTRE_TO_MOUTH = 0.45  # crop centre between the eye midpoint (0) and the mouth (1): around the nose


@dataclass
class FaceStats:
    """What detection found in a clip; recorded in the shard metadata."""

    frames: int
    detected: int  # frames where the main track has its own detection (the rest are filled)
    tracks: int
    mean_score: float
    scores: np.ndarray | None = None  # (T,) the main track's detector score per frame, NaN where filled

    @property
    def fraction(self) -> float:
        return self.detected / self.frames if self.frames else 0.0


class FaceDetector:
    """mediapipe BlazeFace (short range) on RGB frames; one instance per worker process.

    The detector resamples every image to its 128x128 input itself, at a cost (~2 ms a call, mostly the
    network) that barely depends on the image size, and reports boxes in whole pixels of the image it is
    given: frames are therefore passed at full size, and only those whose long side exceeds
    ``detect_long_side`` are downscaled first.
    """

    def __init__(self, model_path: str, min_confidence: float = 0.5, detect_long_side: int = 1280):
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceDetectorOptions(base_options=BaseOptions(model_asset_path=str(model_path)),
                                             running_mode=vision.RunningMode.IMAGE,
                                             min_detection_confidence=min_confidence)
        self._detector = vision.FaceDetector.create_from_options(options)
        self.detect_long_side = detect_long_side

    def detect(self, frame: np.ndarray) -> np.ndarray:
        """frame: (H, W, 3) uint8 RGB. Returns (faces, 11): geometry columns (pixels) and a score column."""
        import mediapipe as mp

        height, width = frame.shape[:2]
        scale = min(1.0, self.detect_long_side / max(height, width))
        small = frame if scale == 1.0 else cv2.resize(frame, (round(width * scale), round(height * scale)),
                                                      interpolation=cv2.INTER_LINEAR)
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(small))
        found = self._detector.detect(image).detections
        rows = [_detection_row(face, scale, width, height) for face in found]
        return np.array(rows, dtype=np.float32).reshape(-1, 11)

    def close(self) -> None:
        if self._detector is not None:
            self._detector.close()
            self._detector = None

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def detect_frames(detector: FaceDetector, frames: np.ndarray, every: int = 1) -> list[np.ndarray | None]:
    """Detections on frames 0, every, 2 * every, ... and the last frame; None for the frames skipped.

    frames: (T, H, W, 3) uint8 RGB. The last frame is always examined so that the track's end is
    interpolated rather than held. Returns per frame (faces, 11) as ``FaceDetector.detect``, or None.
    """
    last = len(frames) - 1
    return [detector.detect(frame) if t % every == 0 or t == last else None for t, frame in enumerate(frames)]


def _detection_row(found, scale: float, width: int, height: int) -> list[float]:
    """One mediapipe detection as [x0, y0, x1, y1, rex, rey, lex, ley, mx, my, score] in frame pixels."""
    box = found.bounding_box
    x0, y0 = box.origin_x / scale, box.origin_y / scale
    points = [(p.x * width, p.y * height) for p in found.keypoints]  # right eye, left eye, nose, mouth, ...
    return [x0, y0, x0 + box.width / scale, y0 + box.height / scale, *points[0], *points[1], *points[3],
            found.categories[0].score]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[X1], b[X1]) - max(a[X0], b[X0]))
    height = max(0.0, min(a[Y1], b[Y1]) - max(a[Y0], b[Y0]))
    union = (a[X1] - a[X0]) * (a[Y1] - a[Y0]) + (b[X1] - b[X0]) * (b[Y1] - b[Y0]) - width * height
    return width * height / union if union > 0 else 0.0


def link_tracks(detections: list[np.ndarray | None], max_gap: int = 25,
                min_iou: float = 0.3) -> list[dict[int, int]]:
    """Greedily link per-frame detections into tracks by box overlap.

    detections: per frame, (faces, 11), or None for a frame that was not examined.
    Returns tracks as {frame index: row index in that frame}.
    """
    tracks: list[dict[int, int]] = []
    for t, rows in enumerate(detections):
        if rows is None:  # frame not examined
            continue
        taken: set[int] = set()
        for i in np.argsort(-rows[:, 10]) if len(rows) else []:
            open_tracks = [k for k, track in enumerate(tracks)
                           if k not in taken and 0 < t - max(track) <= max_gap]
            overlaps = [(_iou(detections[max(tracks[k])][tracks[k][max(tracks[k])]], rows[i]), k)
                        for k in open_tracks]
            best = max(overlaps, default=(0.0, -1))
            if best[0] >= min_iou:
                tracks[best[1]][t] = int(i)
                taken.add(best[1])
            else:
                tracks.append({t: int(i)})
                taken.add(len(tracks) - 1)
    return tracks


def _track_weight(track: dict[int, int], detections: list[np.ndarray]) -> float:
    """Sum over frames of the face's box side: favours faces that are large and present for long."""
    return sum(float(np.sqrt((row[X1] - row[X0]) * (row[Y1] - row[Y0])))
               for row in (detections[t][i] for t, i in track.items()))


def main_track_geometry(detections: list[np.ndarray | None],
                        smooth_frames: int = 5) -> tuple[np.ndarray, FaceStats]:
    """Geometry of the main face in every frame: (T, 10) float32, filled and smoothed over time.

    ``FaceStats.frames`` counts the examined frames (those whose detections are not None).

    Raises ValueError when no frame has a face.
    """
    tracks = link_tracks(detections)
    if not tracks:
        raise ValueError("no face detected in any frame")
    main = max(tracks, key=lambda track: _track_weight(track, detections))
    known = np.array(sorted(main))
    rows = np.stack([detections[t][main[t]] for t in known])
    frames = np.arange(len(detections))
    geometry = np.stack([np.interp(frames, known, rows[:, c]) for c in range(10)], axis=1)
    geometry = uniform_filter1d(geometry, size=smooth_frames, axis=0, mode="nearest")
    examined = sum(rows is not None for rows in detections)
    scores = np.full(len(detections), np.nan, dtype=np.float32)
    scores[known] = rows[:, 10]
    stats = FaceStats(frames=examined, detected=len(known), tracks=len(tracks),
                      mean_score=float(rows[:, 10].mean()), scores=scores)
    return geometry.astype(np.float32), stats


def crop_transform(row: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """(2, 3) affine map from frame pixels to the crop: eyes level, face centred, scaled to ``size``."""
    eyes = (row[[REX, REY]] + row[[LEX, LEY]]) / 2
    dx, dy = row[LEX] - row[REX], row[LEY] - row[REY]
    angle = np.arctan2(dy, dx)
    centre = eyes + CENTRE_TO_MOUTH * (row[[MX, MY]] - eyes)
    side = FACE_TO_CROP * np.sqrt((row[X1] - row[X0]) * (row[Y1] - row[Y0]))
    scale = size / side
    rotate = scale * np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    shift = np.array([size / 2, size / 2]) - rotate @ centre
    return np.concatenate([rotate, shift[:, None]], axis=1).astype(np.float32)


def crop_faces(frames: np.ndarray, geometry: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """frames: (T, H, W, 3) uint8; geometry: (T, 10). Returns (T, size, size, 3) uint8 aligned crops."""
    crops = np.empty((len(frames), size, size, 3), dtype=np.uint8)
    for t, (frame, row) in enumerate(zip(frames, geometry, strict=True)):
        crops[t] = cv2.warpAffine(frame, crop_transform(row, size), (size, size), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crops
