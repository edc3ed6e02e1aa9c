"""The shard sample format: one WebDataset sample per clip.

A shard is a tar file; each clip is three members sharing a key (``<key>.<field>``):

    frames.jpgs   the clip's aligned 160x160 RGB face crops at ``meta.fps``, one baseline JPEG per frame,
                  packed as: uint32 little-endian frame count n, n uint32 byte lengths, then the n JPEGs
    fbank.npy     the clip's 128-bin Kaldi log-mel filterbank, float16, (fbank_frames, 128), .npy format
    meta.json     dataset, clip_id, label, targets, speaker, fold, fps, num_frames, duration, fbank_rate,
                  fbank_frames, face-detection stats, source file paths and sha256 (see ``clip_meta``)

Time alignment: video frame t covers [t / fps, (t + 1) / fps) seconds; fbank frame i covers
[i / fbank_rate, i / fbank_rate + 0.025). So a window of video frames [t0, t1) matches fbank frames
[t0 * fbank_rate / fps, t1 * fbank_rate / fps) (4 fbank frames per video frame at 25 fps).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds

JPEG_QUALITY = 90
FRAMES_FIELD, FBANK_FIELD, META_FIELD = "frames.jpgs", "fbank.npy", "meta.json"


@dataclass
class ClipSample:
    """One decoded clip: frames (T, 160, 160, 3) uint8 RGB, fbank (N, 128) float32, meta dict."""

    frames: np.ndarray
    fbank: np.ndarray
    meta: dict

    @property
    def key(self) -> str:
        return self.meta["key"]


def sample_key(clip_id: str) -> str:
    """A tar-safe key (no dots or slashes) that stays unique: the cleaned clip id plus a hash of it."""
    digest = hashlib.sha256(clip_id.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', clip_id)[:80]}_{digest}"


def encode_frames(frames: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """(T, H, W, 3) uint8 RGB -> the packed JPEG sequence described above."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    jpegs = []
    for frame in frames:
        ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), params)  # BGR, as cv2 wants
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        jpegs.append(buffer.tobytes())
    header = struct.pack(f"<{len(jpegs) + 1}I", len(jpegs), *(len(j) for j in jpegs))
    return header + b"".join(jpegs)


def decode_frames(blob: bytes) -> np.ndarray:
    """The packed JPEG sequence -> (T, H, W, 3) uint8 RGB."""
    (count,) = struct.unpack_from("<I", blob)
    lengths = struct.unpack_from(f"<{count}I", blob, 4)
    offset = 4 * (count + 1)
    frames = []
    for length in lengths:
        jpeg = np.frombuffer(blob, np.uint8, length, offset)
        frames.append(cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[:, :, ::-1])
        offset += length
    return np.ascontiguousarray(np.stack(frames)) if frames else np.zeros((0, 160, 160, 3), np.uint8)


def encode_fbank(fbank: np.ndarray) -> bytes:
    """(N, 128) float -> .npy bytes of float16."""
    buffer = io.BytesIO()
    np.save(buffer, fbank.astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def encode_sample(frames: np.ndarray, fbank: np.ndarray, meta: dict, quality: int = JPEG_QUALITY) -> dict:
    """A clip as a WebDataset sample dict (``__key__`` from ``meta['key']``)."""
    return {"__key__": meta["key"], FRAMES_FIELD: encode_frames(frames, quality), FBANK_FIELD: encode_fbank(fbank),
            META_FIELD: json.dumps(meta, sort_keys=True).encode()}


def decode_sample(sample: dict) -> ClipSample:
    """A raw WebDataset sample (field -> bytes, as ``webdataset.WebDataset`` yields it) -> ClipSample."""
    meta = json.loads(sample[META_FIELD])
    fbank = np.load(io.BytesIO(sample[FBANK_FIELD]), allow_pickle=False).astype(np.float32)
    return ClipSample(frames=decode_frames(sample[FRAMES_FIELD]), fbank=fbank, meta=meta)


def write_shard(path: str | os.PathLike, samples: Iterable[dict]) -> int:
    """Write encoded samples to ``path`` atomically (temp file, then rename); returns the sample count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream)
        for sample in samples:
            writer.write(sample)
            count += 1
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    return count


def iter_shards(paths: Iterable[str | os.PathLike]) -> Iterator[ClipSample]:
    """Read shards in order and yield every clip decoded."""
    urls = [str(path) for path in paths]
    if not urls:
        return
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        yield decode_sample(sample)


def fbank_window(t0: int, t1: int, fps: float, fbank_rate: float) -> tuple[int, int]:
    """fbank frame range [i0, i1) that covers video frames [t0, t1)."""
    return round(t0 * fbank_rate / fps), round(t1 * fbank_rate / fps)
