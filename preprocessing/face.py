"""Face alignment: the main face's geometry per frame in, 160x160 aligned face crops out.

Detection is in ``face_detect.py``, the choice of the main face over time in ``face_tracks.py``. Each frame is
rotated so the eyes are level and cropped to a square around the face, framed like OpenFace's
similarity-aligned crops (``-simscale 0.7``: the face fills most of the crop with a small margin), and resized
to 160x160.
"""

from __future__ import annotations

import cv2
import numpy as np

# Columns of a face geometry row: box corners, the subject's right and left eye, the mouth centre.
X0, Y0, X1, Y1, REX, REY, LEX, LEY, MX, MY = range(10)
CROP_SIZE = 160
FACE_TO_CROP = 1.45  # crop side / detector box side: the face fills ~70% of the crop, as OpenFace's 0.7
CENTRE_TO_MOUTH = 0.45  # crop centre between the eye midpoint (0) and the mouth (1): around the nose


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
