"""Decoding media with PyAV: video at a fixed frame rate, audio as 16 kHz mono float32.

Both streams share one timeline. Its origin is the segment start when a clip is a segment of a longer
recording, else the first video frame's presentation time. Output video frame t shows the source frame
whose presentation time is nearest to ``origin + t / fps`` (this handles variable frame rates, and duplicates
or drops frames to reach the target rate) and is rotated upright by the stream's display matrix. The audio
is cut or zero-padded to exactly the video's duration so that audio sample s plays at ``origin + s / 16000``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

AUDIO_RATE = 16000


class MediaError(Exception):
    """A clip that cannot be used; ``reason`` is a short name for the status table."""

    def __init__(self, reason: str, path: str | Path, detail: str):
        super().__init__(f"{path}: {reason}: {detail}")
        self.reason = reason
        self.path = str(path)
        self.detail = detail


@dataclass
class VideoClip:
    """frames: (T, H, W, 3) uint8 RGB at ``fps``, upright; duration: T / fps seconds."""

    frames: np.ndarray
    fps: float
    source_fps: float
    rotation: int

    @property
    def duration(self) -> float:
        return len(self.frames) / self.fps


@contextmanager
def open_media(path: str | Path) -> Iterator[av.container.InputContainer]:
    """Open a media file; any failure to open it is a ``MediaError('unreadable')`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MediaError("unreadable", path, "no such file")
    if path.stat().st_size == 0:
        raise MediaError("unreadable", path, "the file is empty")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as err:
        raise MediaError("unreadable", path, f"not a media file PyAV can open ({err})") from err
    try:
        yield container
    finally:
        container.close()


def _output_size(width: int, height: int, max_short_side: int) -> tuple[int, int]:
    """Frame size after capping the short side (even numbers keep swscale fast)."""
    scale = min(1.0, max_short_side / min(width, height))
    if scale == 1.0:
        return width, height
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _to_rgb(frame: av.VideoFrame, max_short_side: int, reformatter: VideoReformatter) -> np.ndarray:
    """One decoded frame as upright (H, W, 3) uint8 RGB.

    ``reformatter`` is shared by a clip's frames: it keeps one swscale context (``frame.to_ndarray`` would
    build a new context, and with it a pool of scaling threads, for every frame: 3x the decoding time).
    Scaling runs on one thread; parallelism comes from the workers.
    """
    width, height = _output_size(frame.width, frame.height, max_short_side)
    image = reformatter.reformat(frame, width=width, height=height, format="rgb24", threads=1).to_ndarray()
    quarter_turns = round(frame.rotation / 90) % 4  # display matrix: rotate counter-clockwise to show
    return np.ascontiguousarray(np.rot90(image, quarter_turns)) if quarter_turns else image


def _timed_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                  path: str | Path) -> Iterator[tuple[float, float, av.VideoFrame]]:
    """Yield (presentation time, display duration, frame) in decoding order, seconds.

    A stream that breaks off part-way (a damaged or cut file) ends at its last good frame.
    """
    rate = stream.average_rate or stream.guessed_rate
    nominal = 1.0 / float(rate) if rate else 1 / 25
    time = None
    try:
        for frame in container.decode(stream):
            time = frame.time if frame.time is not None else (time + nominal if time is not None else 0.0)
            has_duration = frame.duration and frame.time_base
            duration = float(frame.duration * frame.time_base) if has_duration else nominal
            yield time, duration, frame
    except av.FFmpegError as err:
        if time is None:
            raise MediaError("unreadable", path, f"video does not decode ({err})") from err


def _nearest_frames(timed: Iterator[tuple[float, float, av.VideoFrame]], fps: float, origin: float,
                    end: float | None) -> Iterator[av.VideoFrame]:
    """For t = 0, 1, ... yield the frame whose time is nearest to ``origin + t / fps``.

    ``timed`` must be in presentation order. The output covers [origin, end), or up to the end of the last
    frame's display time when ``end`` is None: round(duration * fps) frames.
    """
    t, previous = 0, None
    for time, duration, frame in timed:
        if previous is not None:
            midpoint = (previous[0] + time) / 2
            while origin + t / fps < midpoint and (end is None or origin + t / fps < end):
                yield previous[2]
                t += 1
        previous = (time, duration, frame)
        if end is not None and time >= end:
            break
    if previous is None:
        return
    stop = end if end is not None else previous[0] + previous[1]
    for _ in range(t, round((stop - origin) * fps)):
        yield previous[2]


def decode_video(path: str | Path, fps: float = 25.0, start: float | None = None, end: float | None = None,
                 max_short_side: int = 480) -> tuple[VideoClip, float]:
    """Decode the first video stream resampled to ``fps`` by nearest presentation time.

    Returns the clip and its timeline origin in seconds. Frames larger than ``max_short_side`` on their short
    side are scaled down while decoding (face crops are 160 pixels; this bounds memory for HD sources).
    """
    with open_media(path) as container:
        if not container.streams.video:
            raise MediaError("no_video_stream", path, "the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if start:
            container.seek(int(start / stream.time_base), stream=stream, backward=True)
        timed = _timed_frames(container, stream, path)
        first = next(timed, None)
        if first is None:
            raise MediaError("unreadable", path, "the video stream has no decodable frame")
        origin = start if start is not None else first[0]
        picked: list[np.ndarray] = []
        last_frame = None
        reformatter = VideoReformatter()
        for frame in _nearest_frames(itertools.chain([first], timed), fps, origin, end):
            picked.append(picked[-1] if frame is last_frame else _to_rgb(frame, max_short_side, reformatter))
            last_frame = frame
        source_fps = float(stream.average_rate or stream.guessed_rate or fps)
        rotation = int(first[2].rotation)
    if not picked:
        raise MediaError("too_short", path, "no video frame falls inside the clip")
    clip = VideoClip(frames=np.stack(picked), fps=fps, source_fps=source_fps, rotation=rotation)
    return clip, origin


def decode_audio(path: str | Path, origin: float, duration: float | None) -> tuple[np.ndarray, float]:
    """Decode the first audio stream as 16 kHz mono float32 on the timeline starting at ``origin``.

    Returns (samples,) float32 and the audio's own duration in seconds from ``origin``. With ``duration``
    the waveform is cut or zero-padded to ``round(duration * 16000)`` samples.
    """
    with open_media(path) as container:
        if not container.streams.audio:
            raise MediaError("no_audio_stream", path, "the file has no audio stream")
        stream = container.streams.audio[0]
        if origin > 0:
            container.seek(int(origin / stream.time_base), stream=stream, backward=True)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        chunks: list[np.ndarray] = []
        first_time = None
        try:
            for frame in container.decode(stream):
                if first_time is None:
                    first_time = frame.time if frame.time is not None else 0.0
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
                if duration is not None and frame.time is not None and frame.time > origin + duration + 1:
                    break
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
        except av.FFmpegError as err:
            if not chunks:
                raise MediaError("unreadable", path, f"audio does not decode ({err})") from err
    if first_time is None:
        raise MediaError("no_audio_stream", path, "the audio stream has no decodable frame")
    wave = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    wave = _place_on_timeline(wave, round((first_time - origin) * AUDIO_RATE))
    own_duration = len(wave) / AUDIO_RATE
    if duration is not None:
        wave = _fit_length(wave, round(duration * AUDIO_RATE))
    return wave, own_duration


def _place_on_timeline(wave: np.ndarray, offset: int) -> np.ndarray:
    """Shift so sample 0 plays at the origin: pad with silence (offset > 0) or drop samples (offset < 0)."""
    if offset > 0:
        return np.concatenate([np.zeros(offset, np.float32), wave])
    return wave[-offset:]


def _fit_length(wave: np.ndarray, length: int) -> np.ndarray:
    if len(wave) >= length:
        return wave[:length]
    return np.concatenate([wave, np.zeros(length - len(wave), np.float32)])
