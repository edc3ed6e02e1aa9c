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
import re
import struct
from dataclasses import dataclass

import cv2
import numpy as np

JPEG_QUALITY = 90
FRAMES_FIELD, FBANK_FIELD, META_FIELD = "frames.jpgs", "fbank.npy", "meta.json"

class PackedFrames:
    """A clip's packed JPEG sequence (``frames.jpgs``), decoded frame by frame on demand.

    ``len(frames)`` is the frame count (from the header, nothing decoded); ``frames[indices]`` decodes only the
    frames named by an int or an index array, each distinct frame once, and returns (k, H, W, 3) uint8 RGB
    equal to the same rows of the fully decoded clip. A 16-frame training window of a 200-frame clip thus
    decodes 16 JPEGs instead of 200.
    """

    def __init__(self, blob: bytes):
        (count,) = struct.unpack_from("<I", blob)
        lengths = np.asarray(struct.unpack_from(f"<{count}I", blob, 4), dtype=np.int64)
        self.blob = blob
        self.lengths = lengths
        self.offsets = 4 * (count + 1) + np.cumsum(lengths) - lengths     # byte offset of every JPEG

    def __len__(self) -> int:
        return len(self.lengths)

    def decode(self, index: int) -> np.ndarray:
        """Frame ``index`` -> (H, W, 3) uint8 RGB, C-contiguous."""
        jpeg = np.frombuffer(self.blob, np.uint8, int(self.lengths[index]), int(self.offsets[index]))
        frame = cv2.imdecode(jpeg, cv2.IMREAD_COLOR_RGB)  # RGB straight from the decoder, no channel swap
        if frame is None:
            raise ValueError(f"{FRAMES_FIELD}: frame {index} of {len(self)} is not a readable JPEG")
        return frame

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.arange(len(self))[indices]  # ints, slices and index arrays, with numpy's bounds checks
        if indices.ndim == 0:
            return self.decode(int(indices))
        if len(indices) == 0:
            return np.zeros((0, 160, 160, 3), np.uint8)
        unique, inverse = np.unique(indices, return_inverse=True)
        decoded = np.stack([self.decode(int(i)) for i in unique])     # (distinct, H, W, 3)
        if len(unique) == len(indices) and (unique == indices).all():
            return decoded                                            # ascending, no repeats: already in order
        return decoded[inverse.reshape(-1)]


@dataclass
class ClipSample:
    """One decoded clip: frames (T, 160, 160, 3) uint8 RGB (or the still packed ``PackedFrames``, which index
    the same way), fbank (N, 128) float32 (or float16 as stored), meta dict."""

    frames: np.ndarray | PackedFrames
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
    return PackedFrames(blob)[:]


def encode_fbank(fbank: np.ndarray) -> bytes:
    """(N, 128) float -> .npy bytes of float16."""
    buffer = io.BytesIO()
    np.save(buffer, fbank.astype(np.float16), allow_pickle=False)
    return buffer.getvalue()


def encode_sample(frames: np.ndarray, fbank: np.ndarray, meta: dict, quality: int = JPEG_QUALITY) -> dict:
    """A clip as a WebDataset sample dict (``__key__`` from ``meta['key']``)."""
    return {"__key__": meta["key"], FRAMES_FIELD: encode_frames(frames, quality), FBANK_FIELD: encode_fbank(fbank),
            META_FIELD: json.dumps(meta, sort_keys=True).encode()}


def decode_sample(sample: dict, lazy: bool = False) -> ClipSample:
    """A raw WebDataset sample (field -> bytes, as ``webdataset.WebDataset`` yields it, or any bytes-like view)
    -> ClipSample.

    ``lazy`` leaves the frames packed (``PackedFrames``: only the frames a caller indexes get decoded) and the fbank
    float16 as stored (a window converts only its own rows, to the same float32 values).
    """
    meta = json.loads(bytes(sample[META_FIELD]))
    fbank = np.load(io.BytesIO(sample[FBANK_FIELD]), allow_pickle=False)
    frames = PackedFrames(sample[FRAMES_FIELD])
    if lazy:
        return ClipSample(frames=frames, fbank=fbank, meta=meta)
    return ClipSample(frames=frames[:], fbank=fbank.astype(np.float32), meta=meta)


def fbank_window(t0: int, t1: int, fps: float, fbank_rate: float) -> tuple[int, int]:
    """fbank frame range [i0, i1) that covers video frames [t0, t1)."""
    return round(t0 * fbank_rate / fps), round(t1 * fbank_rate / fps)
