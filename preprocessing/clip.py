"""One clip from its source media to a shard sample: decode, detect, align and crop, fbank, encode."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.decode import AUDIO_RATE, MediaError, VideoClip, decode_audio, decode_video
from preprocessing.face import crop_faces
from preprocessing.face_detect import FaceDetector, Region, detect_frames
from preprocessing.face_tracks import FaceStats, main_track_geometry, shot_ids
from preprocessing.fbank import FRAME_LENGTH, FRAME_SHIFT, FRAMES_PER_SECOND, log_mel_fbank
from preprocessing.fileio import sha256_file
from preprocessing.manifest import ClipRecord, DatasetInfo
from preprocessing.settings import PreprocessSettings
from preprocessing.shards import encode_sample

STAGES = ("decode", "detect", "align_crop", "fbank", "encode", "write")


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the block to ``timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def clip_meta(info: DatasetInfo, clip: ClipRecord, key: str, settings: PreprocessSettings, **fields) -> dict:
    """The meta.json of a sample: the clip's labels plus what preprocessing measured."""
    return {"dataset": info.name, "clip_id": clip.clip_id, "key": key, "label": clip.label,
            "targets": clip.targets, "speaker": clip.speaker, "fold": clip.fold, "fps": settings.fps,
            "fbank_rate": FRAMES_PER_SECOND, "fbank_shift_s": FRAME_SHIFT / AUDIO_RATE,
            "fbank_window_s": FRAME_LENGTH / AUDIO_RATE, "crop_size": settings.crop_size,
            "frames_format": f"jpeg q{settings.jpeg_quality}", **fields}


def face_meta(stats: FaceStats) -> dict:
    """The face-detection part of meta.json: counts, per-frame detector letters, main-face size in pixels."""
    sides = stats.sides[np.isfinite(stats.sides)]
    return {"frames": stats.frames, "detected": stats.detected, "fraction": round(stats.fraction, 4),
            "tracks": stats.tracks, "mean_score": round(stats.mean_score, 4), "cuts": stats.cuts,
            "detectors": stats.detector_letters(), "detector_frames": stats.detector_counts(),
            "side_px": {"median": round(float(np.median(sides)), 1),
                        "p5": round(float(np.percentile(sides, 5)), 1)}}


@dataclass
class ClipMedia:
    """A clip decoded and face-tracked: what a shard sample (and a single-video prediction) is made from."""

    video: VideoClip          # frames (T, H, W, 3) uint8 RGB at ``settings.fps``, upright
    origin: float             # timeline origin: seconds into the source file of frame 0
    geometry: np.ndarray      # (T, 10) main face per frame (face.py columns), in ``video.frames`` pixels
    face: FaceStats           # incl. per frame (T,) the detector score and pass, NaN / -1 where filled
    crops: np.ndarray         # (T, crop_size, crop_size, 3) uint8 aligned face crops
    fbank: np.ndarray         # (N, 128) float32 log-mel of the audio on the same timeline
    audio_duration: float     # seconds of audio the file holds from ``origin``


def load_clip_media(video_path: Path, audio_path: Path, start: float | None, end: float | None,
                    settings: PreprocessSettings, detector: FaceDetector, timings: dict[str, float],
                    region: Region | None = None) -> ClipMedia:
    """Decode, detect, track (inside ``region``, the clip's face region hint), align and crop, fbank; failures
    raise MediaError with a reason."""
    with timed(timings, "decode"):
        video, origin = decode_video(video_path, settings.fps, start, end, settings.max_short_side)
        if video.duration < settings.min_duration:
            raise MediaError("too_short", video_path, f"{video.duration:.3f} s of video, "
                             f"less than {settings.min_duration} s")
        wave, audio_duration = decode_audio(audio_path, origin, video.duration)
    with timed(timings, "detect"):
        detections = detect_frames(detector, video.frames, settings.detect_every, region)
        shots = shot_ids(video.frames)
    with timed(timings, "align_crop"):
        try:
            geometry, stats = main_track_geometry(detections, smooth_frames=settings.smooth_frames, shots=shots,
                                                  region=region, frame_shape=video.frames.shape[1:])
        except ValueError as err:
            raise MediaError("no_face", video_path, str(err)) from err
        if stats.fraction < settings.min_face_fraction:
            raise MediaError("no_face", video_path, f"a face in {stats.detected} of {stats.frames} frames, "
                             f"fewer than {settings.min_face_fraction:.0%}")
        crops = crop_faces(video.frames, geometry, settings.crop_size)
    with timed(timings, "fbank"):
        fbank = log_mel_fbank(wave, AUDIO_RATE)
    return ClipMedia(video=video, origin=origin, geometry=geometry, face=stats, crops=crops, fbank=fbank,
                     audio_duration=audio_duration)


def source_hash(path: Path, expected: str | None) -> str:
    """The sha256 of a clip's media file; MediaError ``changed`` when the manifest recorded another."""
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        raise MediaError("changed", path, "the file differs from the one the manifest was made from; "
                         "run `hicmae manifest` again")
    return digest


def process_clip(root: Path, info: DatasetInfo, clip: ClipRecord, key: str, settings: PreprocessSettings,
                 detector: FaceDetector, timings: dict[str, float]) -> dict:
    """Turn one clip (media paths relative to the dataset folder ``root``) into an encoded shard sample; failures
    raise MediaError with a reason."""
    video_path = Path(root) / clip.video
    audio_path = Path(root) / clip.audio if clip.audio else video_path
    media = load_clip_media(video_path, audio_path, clip.start, clip.end, settings, detector, timings,
                            clip.face_region)
    video, stats = media.video, media.face
    with timed(timings, "decode"):
        sources = {"video": clip.video, "video_sha256": source_hash(video_path, clip.video_sha256)}
        if clip.audio:
            sources |= {"audio": clip.audio, "audio_sha256": source_hash(audio_path, clip.audio_sha256)}
    meta = clip_meta(info, clip, key, settings, num_frames=len(media.crops), duration=video.duration,
                     fbank_frames=len(media.fbank), audio_duration=round(media.audio_duration, 4),
                     face={**face_meta(stats), "region": clip.face_region},
                     source={**sources, "start": clip.start, "end": clip.end, "origin": media.origin,
                             "source_fps": round(video.source_fps, 4), "rotation": video.rotation,
                             "height": int(video.frames.shape[1]), "width": int(video.frames.shape[2])})
    with timed(timings, "encode"):
        return encode_sample(media.crops, media.fbank, meta, settings.jpeg_quality)
