"""Real test media: real face photographs in frames, espeak-ng speech, encoded by PyAV.

``write_clip`` encodes h264/aac mp4 (or another container by suffix) with options for the awkward cases a
dataset throws at the preprocessing: rotation metadata, variable frame rate, odd sizes, 8 kHz stereo audio,
no audio, no face. By default its frames show the astronaut photo drifting (``face_frame``); ``scene`` gives
other pictures: ``Portrait`` places a real photo's face at a chosen size and place, ``Shot`` strings scenes
together with hard cuts (``cut_scene``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import cv2
import matplotlib.cbook
import numpy as np
from PIL import Image
from skimage import data

# The astronaut's head and shoulders in skimage.data.astronaut() (512x512): rows, columns.
HEAD = (slice(20, 300), slice(110, 340))
# The face in each photo: box centre x, y and side in the photo's pixels (BlazeFace short range on the full photo).
PHOTO_FACES = {"astronaut": (224.5, 129.5, 95.0), "grace_hopper": (268.0, 243.0, 194.0)}
PORTRAIT_TO_FACE = 2.2  # a portrait is the square around the face, this many face sides wide


@lru_cache(maxsize=1)
def head_image() -> np.ndarray:
    """(280, 230, 3) uint8 RGB: the astronaut's head with some background."""
    return np.ascontiguousarray(data.astronaut()[HEAD])


def face_frame(width: int, height: int, t: float, face: bool = True) -> np.ndarray:
    """One (height, width, 3) frame: a textured background and, if ``face``, the head drifting slowly."""
    ys, xs = np.mgrid[0:height, 0:width]
    frame = np.stack([(xs * 255 // max(width, 1)), (ys * 255 // max(height, 1)),
                      np.full_like(xs, 90)], axis=-1).astype(np.uint8)
    if face:
        head_h = int(height * 0.85)
        head_w = max(1, int(head_image().shape[1] * head_h / head_image().shape[0]))
        head = cv2.resize(head_image(), (head_w, head_h), interpolation=cv2.INTER_AREA)
        x0 = int((width - head_w) / 2 + 0.05 * width * np.sin(2 * np.pi * t / 2))
        y0 = height - head_h
        x0 = min(max(x0, 0), width - head_w) if head_w <= width else 0
        visible = head[:, : width - x0]
        frame[y0:y0 + head_h, x0:x0 + visible.shape[1]] = visible
    return frame


@lru_cache(maxsize=2)
def photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB: a real photo shipped with an installed package (scikit-image, matplotlib)."""
    if name == "astronaut":
        return data.astronaut()
    with matplotlib.cbook.get_sample_data(f"{name}.jpg") as handle:
        return np.asarray(Image.open(handle).convert("RGB"))


@dataclass(frozen=True)
class Portrait:
    """A photo's face shown ``face_px`` pixels wide with its centre at (x, y), fractions of the frame, drifting
    sideways by ``drift`` of the frame width (a 2 s sine)."""

    photo: str
    face_px: float
    x: float
    y: float
    drift: float = 0.0

    def face_centre(self, width: int, height: int, t: float) -> tuple[float, float]:
        """Where the face's centre is in a (width, height) frame at time t, pixels."""
        return (self.x + self.drift * np.sin(2 * np.pi * t / 2)) * width, self.y * height


def _portrait_image(portrait: Portrait) -> np.ndarray:
    """The square around the photo's face, scaled so the face is ``face_px`` wide: (S, S, 3) uint8."""
    cx, cy, side = PHOTO_FACES[portrait.photo]
    half = PORTRAIT_TO_FACE * side / 2
    image = photo(portrait.photo)
    square = image[max(0, round(cy - half)):round(cy + half), max(0, round(cx - half)):round(cx + half)]
    scale = portrait.face_px / side
    size = max(1, round(square.shape[1] * scale)), max(1, round(square.shape[0] * scale))
    return cv2.resize(square, size, interpolation=cv2.INTER_AREA)


def background(width: int, height: int, variant: int = 0) -> np.ndarray:
    """(height, width, 3) uint8: a colour gradient; each variant has other colours (another shot)."""
    ys, xs = np.mgrid[0:height, 0:width]
    ramps = [xs * 255 // max(width, 1), ys * 255 // max(height, 1), np.full_like(xs, 90)]
    ramps = ramps[variant % 3:] + ramps[:variant % 3]
    return np.stack(ramps, axis=-1).astype(np.uint8)


def scene(portraits: Sequence[Portrait], variant: int = 0) -> Callable[[int, int, float], np.ndarray]:
    """A frame source for ``write_clip``: the portraits on a background, at their places at time t."""
    def frame_at(width: int, height: int, t: float) -> np.ndarray:
        frame = background(width, height, variant)
        for portrait in portraits:
            image = _portrait_image(portrait)
            cx, cy = portrait.face_centre(width, height, t)
            _paste(frame, image, round(cx - image.shape[1] / 2), round(cy - image.shape[0] / 2))
        return frame
    return frame_at


@dataclass(frozen=True)
class Shot:
    """``portraits`` shown until ``end`` seconds, on background ``variant``."""

    end: float
    portraits: tuple[Portrait, ...]
    variant: int


def cut_scene(shots: Sequence[Shot]) -> Callable[[int, int, float], np.ndarray]:
    """A frame source that cuts from shot to shot at their end times (the last shot runs on)."""
    def frame_at(width: int, height: int, t: float) -> np.ndarray:
        shot = next((shot for shot in shots if t < shot.end), shots[-1])
        return scene(shot.portraits, shot.variant)(width, height, t)
    return frame_at


def _paste(frame: np.ndarray, image: np.ndarray, x: int, y: int) -> None:
    """Copy ``image`` into ``frame`` with its top-left corner at (x, y), clipped to the frame."""
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + image.shape[1], width), min(y + image.shape[0], height)
    if x0 < x1 and y0 < y1:
        frame[y0:y1, x0:x1] = image[y0 - y:y1 - y, x0 - x:x1 - x]


def speech_wav(path: str | Path, text: str = "The quick brown fox jumps over the lazy dog") -> Path:
    """Synthesise speech with espeak-ng (22.05 kHz mono wav)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    return Path(path)


def load_audio(path: str | Path, rate: int, channels: int) -> np.ndarray:
    """Decode any audio file to (channels, samples) float32 at ``rate``."""
    layout = "mono" if channels == 1 else "stereo"
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
    chunks = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            chunks += [out.to_ndarray() for out in resampler.resample(frame)]
    chunks += [out.to_ndarray() for out in resampler.resample(None)]
    return np.concatenate(chunks, axis=1)


def _audio_stream(container, rate: int, channels: int, codec: str):
    return container.add_stream(codec, rate=rate, layout="mono" if channels == 1 else "stereo")


def _encode_audio(container, stream, samples: np.ndarray, rate: int, codec: str) -> None:
    """Encode (channels, samples) float32 into ``stream``, 1024-sample frames."""
    layout = "mono" if len(samples) == 1 else "stereo"
    fmt = "fltp" if codec == "aac" else "s16"
    for start in range(0, samples.shape[1], 1024):
        chunk = samples[:, start:start + 1024]
        if fmt == "s16":
            chunk = (np.clip(chunk, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=fmt, layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def write_clip(path: str | Path, seconds: float = 2.0, size: tuple[int, int] = (320, 240), fps: int = 25,
               face: bool = True, speech: Path | None = None, audio_rate: int = 44100, channels: int = 1,
               video: bool = True, rotation: int = 0, vfr: bool = False, codec: str = "libx264",
               frames: Callable[[int, int, float], np.ndarray] | None = None) -> Path:
    """Encode a test clip and return its path.

    frames: the picture at (width, height, t) (``scene``, ``cut_scene``); default: the astronaut drifting
    (``face_frame``; no face with ``face=False``). size: displayed (width, height). rotation: degrees
    counter-clockwise stored in the display matrix; the pixels are stored turned the other way, so a correct
    decoder shows the face upright. vfr: frame intervals alternate 20 ms and 60 ms (40 ms on average). speech:
    a wav to use as the audio track (None: no audio).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    audio_codec = "pcm_s16le" if path.suffix in (".wav", ".avi", ".mkv") else "aac"
    with av.open(str(path), "w") as container:
        video_stream = _video_stream(container, size, fps, rotation, vfr, codec) if video else None
        audio_stream = _audio_stream(container, audio_rate, channels, audio_codec) if speech else None
        if video_stream is not None:
            frame_at = frames or (lambda width, height, t: face_frame(width, height, t, face))
            _encode_video(container, video_stream, seconds, size, fps, frame_at, rotation, vfr)
        if audio_stream is not None:
            samples = load_audio(speech, audio_rate, channels)
            samples = np.pad(samples, ((0, 0), (0, max(0, int(seconds * audio_rate) - samples.shape[1]))))
            _encode_audio(container, audio_stream, samples[:, : int(seconds * audio_rate)], audio_rate,
                          audio_codec)
    return path


def _video_stream(container, size, fps, rotation, vfr, codec):
    width, height = size
    stored = (height, width) if rotation % 180 else (width, height)
    stream = container.add_stream(codec, rate=fps if not vfr else 1000)
    stream.width, stream.height = stored
    stream.pix_fmt = "yuv420p" if codec in ("libx264", "mpeg4", "flv") else "yuv444p"
    if codec == "libx264":
        stream.options = {"preset": "ultrafast"}
    if vfr:
        stream.codec_context.time_base = Fraction(1, 1000)
    if rotation:
        stream.set_display_rotation(rotation)
    return stream


def _encode_video(container, stream, seconds, size, fps, frame_at, rotation, vfr) -> None:
    width, height = size
    times = _frame_times(seconds, fps, vfr)
    for index, t in enumerate(times):
        image = np.ascontiguousarray(np.rot90(frame_at(width, height, t), -(rotation // 90)))
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = round(t * 1000) if vfr else index
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _frame_times(seconds: float, fps: int, vfr: bool) -> list[float]:
    if not vfr:
        return [i / fps for i in range(round(seconds * fps))]
    times, t, steps = [], 0.0, [0.02, 0.06]
    while t < seconds - 1e-9:
        times.append(t)
        t += steps[len(times) % 2]
    return times
