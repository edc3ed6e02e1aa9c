"""The demo dataset's pictures: a real face photograph, restyled per speaker, moved per emotion.

The face is the astronaut portrait bundled with scikit-image (``skimage.data.astronaut()``, public
domain, NASA). Each speaker gets its own colour cast, face size, position and background; each emotion
class its own head motion (zoom pulsing, nodding, shaking, tilting), with per-clip jitter of amplitude,
frequency and phase so a model must learn the motion, not one exact trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

FACE_BOX = (5, 215, 135, 315)  # rows and columns of the head (with hair) in the 512x512 portrait


@dataclass(frozen=True)
class SpeakerLook:
    """How one speaker looks: colour gains, face height as a fraction of the frame, offset, background."""

    gains: tuple[float, float, float]
    face_fraction: float
    offset: tuple[float, float]
    background: tuple[tuple[int, int, int], tuple[int, int, int]]


@dataclass(frozen=True)
class Motion:
    """One clip's head motion: kind, amplitude, frequency (Hz) and phase (radians)."""

    kind: str
    amplitude: float
    frequency: float
    phase: float


MOTION_OF_CLASS = {  # kind, base amplitude (fraction of frame, or degrees for tilt), base frequency
    "neutral": ("zoom", 0.05, 0.6),
    "happy": ("nod", 0.07, 2.4),
    "angry": ("shake", 0.08, 3.4),
    "sad": ("tilt", 13.0, 0.7),
}


def face_patch() -> tuple[np.ndarray, np.ndarray]:
    """The portrait's head as float RGB in [0, 1] and a soft elliptical alpha mask of the same size."""
    from skimage import data

    top, bottom, left, right = FACE_BOX
    patch = data.astronaut()[top:bottom, left:right].astype(np.float32) / 255.0
    height, width = patch.shape[:2]
    mask = np.zeros((height, width), np.float32)
    cv2.ellipse(mask, (width // 2, height // 2), (int(width * 0.46), int(height * 0.48)), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=4)
    return patch, mask


def random_look(rng: np.random.Generator) -> SpeakerLook:
    """A speaker's look drawn from ``rng``."""
    gains = tuple(float(g) for g in rng.uniform(0.75, 1.2, size=3))
    top, bottom = (tuple(int(c) for c in rng.integers(20, 236, size=3)) for _ in range(2))
    return SpeakerLook(gains=gains, face_fraction=float(rng.uniform(0.8, 0.95)),
                       offset=(float(rng.uniform(-0.07, 0.07)), float(rng.uniform(-0.05, 0.05))),
                       background=(top, bottom))


def random_motion(emotion: str, rng: np.random.Generator) -> Motion:
    """A clip's motion for ``emotion``: the class's kind with jittered amplitude, frequency and phase."""
    kind, amplitude, frequency = MOTION_OF_CLASS[emotion]
    return Motion(kind=kind, amplitude=amplitude * float(rng.uniform(0.85, 1.15)),
                  frequency=frequency * float(rng.uniform(0.85, 1.15)),
                  phase=float(rng.uniform(0, 2 * np.pi)))


def background_image(look: SpeakerLook, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A vertical colour gradient with fine fixed noise, float RGB (height, width, 3)."""
    height, width = size
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    top, bottom = (np.array(c, np.float32) / 255.0 for c in look.background)
    image = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (height, width, 3)).copy()
    image += rng.normal(0, 0.02, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 1)


def pose_at(motion: Motion, t: float) -> tuple[float, float, float, float]:
    """(dx, dy, scale factor, angle in degrees) of the head at time ``t`` seconds."""
    wave = float(np.sin(2 * np.pi * motion.frequency * t + motion.phase))
    if motion.kind == "zoom":
        return 0.0, 0.0, 1.0 + motion.amplitude * wave, 0.0
    if motion.kind == "nod":
        return 0.0, motion.amplitude * wave, 1.0, 0.0
    if motion.kind == "shake":
        return motion.amplitude * wave, 0.0, 1.0, 0.0
    return 0.0, 0.0, 1.0, motion.amplitude * wave


def render_frames(look: SpeakerLook, motion: Motion, size: tuple[int, int], fps: float, count: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` uint8 RGB frames of the speaker's head moving as ``motion`` says."""
    patch, mask = face_patch()
    patch = np.clip(patch * np.array(look.gains, np.float32), 0, 1)
    height, width = size
    background = background_image(look, size, rng)
    base_scale = look.face_fraction * height / patch.shape[0]
    centre = (patch.shape[1] / 2, patch.shape[0] / 2)
    frames = []
    for index in range(count):
        dx, dy, zoom, angle = pose_at(motion, index / fps)
        matrix = cv2.getRotationMatrix2D(centre, angle, base_scale * zoom)
        matrix[0, 2] += width * (0.5 + look.offset[0] + dx) - centre[0]
        matrix[1, 2] += height * (0.5 + look.offset[1] + dy) - centre[1]
        face = cv2.warpAffine(patch, matrix, (width, height), flags=cv2.INTER_LINEAR)
        alpha = cv2.warpAffine(mask, matrix, (width, height), flags=cv2.INTER_LINEAR)[..., None]
        frames.append((255 * (background * (1 - alpha) + face * alpha)).astype(np.uint8))
    return frames
