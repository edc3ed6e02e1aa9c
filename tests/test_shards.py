"""The shard format: a clip's frames and fbank encoded and decoded, frames decoded lazily one by one."""

import struct

import cv2
import numpy as np
import pytest

from preprocessing.shards import PackedFrames, decode_frames, decode_sample, encode_frames, encode_sample, fbank_window


def test_shard_sample_round_trip_and_window():
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:160, 0:160]
    frames = np.stack([np.stack([xs + t, ys, xs + ys], axis=-1) for t in range(8)]).astype(np.uint8)
    fbank = rng.normal(-5, 2, (30, 128)).astype(np.float32)
    sample = decode_sample(encode_sample(frames, fbank, {"key": "k", "fps": 25}))
    assert sample.frames.shape == frames.shape
    assert np.abs(sample.frames.astype(int) - frames).mean() < 3
    np.testing.assert_allclose(sample.fbank, fbank, atol=1e-2)
    assert fbank_window(4, 20, fps=25, fbank_rate=100) == (16, 80)


def test_packed_frames_decode_only_the_indexed_frames_and_equal_full_decoding(monkeypatch):
    ys, xs = np.mgrid[0:48, 0:64]
    frames = np.stack([np.stack([xs * 3 + 7 * t, ys * 4, xs + ys], axis=-1) for t in range(10)]).astype(np.uint8)
    blob = encode_frames(frames)
    full = decode_frames(blob)
    assert full.shape == (10, 48, 64, 3)
    first = cv2.imdecode(np.frombuffer(blob, np.uint8, struct.unpack_from("<I", blob, 4)[0], 44), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(full[0], first[:, :, ::-1])   # RGB, as OpenCV's BGR reversed
    packed = PackedFrames(blob)
    decoded = []
    original = PackedFrames.decode
    monkeypatch.setattr(PackedFrames, "decode", lambda self, i: decoded.append(i) or original(self, i))
    assert len(packed) == 10 and decoded == []
    window = np.array([2, 5, 8, 9, 9, 9])                  # a window held at the last frame
    np.testing.assert_array_equal(packed[window], full[window])
    assert sorted(decoded) == [2, 5, 8, 9]                 # each distinct frame once, nothing else
    np.testing.assert_array_equal(packed[3], full[3])
    np.testing.assert_array_equal(packed[-1], full[-1])
    np.testing.assert_array_equal(packed[1:7:2], full[1:7:2])
    assert packed[np.array([], dtype=int)].shape[0] == 0
    with pytest.raises(IndexError):
        packed[np.array([10])]


def test_unreadable_frame_names_the_field_and_the_frame():
    blob = bytearray(encode_frames(np.zeros((2, 16, 16, 3), np.uint8)))
    blob[12:40] = bytes(28)                                 # the first JPEG's header
    with pytest.raises(ValueError, match=r"frames.jpgs: frame 0 of 2"):
        PackedFrames(bytes(blob))[0]
