"""Decoding, face alignment and the shard format on real encoded media (no Ray)."""

import wave
from pathlib import Path

import numpy as np
import pytest
from media import speech_wav, write_clip

from preprocessing.clip import process_clip
from preprocessing.decode import MediaError, _nearest_frames, decode_audio, decode_video
from preprocessing.face_detect import FaceDetector, detect_frames
from preprocessing.manifest import ClipRecord, DatasetInfo
from preprocessing.settings import PreprocessSettings
from preprocessing.shard_index import read_index, read_samples, write_shard
from preprocessing.shards import decode_sample


@pytest.fixture(scope="module")
def detector():
    with FaceDetector.from_settings(PreprocessSettings()) as face_detector:
        yield face_detector


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return speech_wav(tmp_path_factory.mktemp("speech") / "speech.wav")


def _click_wav(path: Path, seconds: float, click_at: float, rate: int = 22050) -> Path:
    """A silent mono wav with one loud 5 ms click."""
    samples = np.zeros(int(seconds * rate), np.int16)
    samples[int(click_at * rate): int(click_at * rate) + rate // 200] = 20000
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.tobytes())
    return path


def test_nearest_frames_resamples_by_timestamp():
    """Source frames at 10 fps with jitter, resampled to 25 fps: each output takes the nearest source."""
    times = [0.0, 0.1, 0.21, 0.3, 0.4]
    timed = iter([(t, 0.1, index) for index, t in enumerate(times)])
    picked = list(_nearest_frames(timed, fps=25, origin=0.0, end=None))
    assert len(picked) == round(0.5 * 25)
    expected = [int(np.argmin([abs(t - k / 25) for t in times])) for k in range(len(picked))]
    assert picked == expected


def test_video_and_audio_share_one_timeline(tmp_path):
    click = _click_wav(tmp_path / "click.wav", 2.0, click_at=1.0)
    path = write_clip(tmp_path / "clip.mp4", seconds=2.0, speech=click, audio_rate=44100)
    video, origin = decode_video(path, fps=25)
    audio, own_duration = decode_audio(path, origin, video.duration)
    assert video.frames.shape == (50, 240, 320, 3)
    assert len(audio) == 32000 and audio.dtype == np.float32
    assert abs(int(np.argmax(np.abs(audio))) - 16000) < 16000 * 0.03  # the click is at 1.0 s (+-30 ms)
    assert abs(own_duration - 2.0) < 0.1


def test_segment_start_end(tmp_path, speech):
    path = write_clip(tmp_path / "long.mp4", seconds=3.0, speech=speech)
    video, origin = decode_video(path, fps=25, start=0.5, end=2.0)
    audio, _ = decode_audio(path, origin, video.duration)
    assert origin == 0.5
    assert len(video.frames) in (37, 38)  # 1.5 s at 25 fps
    assert len(audio) == round(len(video.frames) / 25 * 16000)


def test_rotation_metadata_gives_upright_frames(tmp_path):
    path = write_clip(tmp_path / "rotated.mp4", seconds=1.0, rotation=90)
    video, _ = decode_video(path)
    assert video.rotation == 90
    assert video.frames.shape[1:3] == (240, 320)  # displayed size, not the stored 240x320


def test_variable_frame_rate(tmp_path):
    path = write_clip(tmp_path / "vfr.mp4", seconds=2.0, vfr=True)
    video, _ = decode_video(path, fps=25)
    assert len(video.frames) == 50


def test_eight_khz_stereo_becomes_16k_mono(tmp_path, speech):
    path = write_clip(tmp_path / "stereo.mp4", seconds=1.5, speech=speech, audio_rate=8000, channels=2)
    video, origin = decode_video(path)
    audio, _ = decode_audio(path, origin, video.duration)
    assert audio.shape == (round(video.duration * 16000),)
    assert np.abs(audio).max() > 0.05


def test_unreadable_inputs_name_the_file(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    for path in (empty, text, tmp_path / "missing.mp4"):
        with pytest.raises(MediaError, match=path.name) as error:
            decode_video(path)
        assert error.value.reason == "unreadable"


def test_detect_frames_examines_every_nth_and_the_last_frame():
    class Recorder:
        def __init__(self):
            self.seen = []

        def detect(self, frame, **_):
            self.seen.append(int(frame[0, 0, 0]))
            return np.zeros((1, 12), np.float32)

    frames = np.arange(8, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    recorder = Recorder()
    detections = detect_frames(recorder, frames, every=3)
    assert recorder.seen == [0, 3, 6, 7]
    assert [t for t, rows in enumerate(detections) if rows is not None] == [0, 3, 6, 7]
    assert detect_frames(Recorder(), frames[:1], every=3)[0] is not None


@pytest.mark.system
@pytest.mark.parametrize("detect_every, examined", [(1, 50), (2, 26)])
def test_crop_is_centred_on_the_face(tmp_path, speech, detector, detect_every, examined):
    path = write_clip(tmp_path / "face clip.mp4", seconds=2.0, speech=speech)
    info = DatasetInfo(name="demo", task="unlabelled")
    clip = ClipRecord(clip_id="face/clip.1", video=path.name, speaker="s1", fold=1)
    settings = PreprocessSettings(detect_every=detect_every)
    sample = process_clip(tmp_path, info, clip, "face_clip_1", settings, detector, {})
    index = write_shard(tmp_path / "shard.tar", [sample])
    (raw,) = list(read_samples(read_index(tmp_path / "shard.tar")))
    decoded = decode_sample(raw)
    assert index.clip_ids == ["face/clip.1"] and index.size == (tmp_path / "shard.tar").stat().st_size
    assert decoded.frames.shape == (50, 160, 160, 3) and decoded.frames.dtype == np.uint8
    assert decoded.fbank.shape == (1 + (32000 - 400) // 160, 128) and decoded.fbank.dtype == np.float32
    meta = decoded.meta
    assert meta["clip_id"] == "face/clip.1" and meta["fps"] == 25 and meta["fbank_rate"] == 100
    assert meta["num_frames"] == 50 and abs(meta["duration"] - 2.0) < 1e-6
    assert meta["face"]["fraction"] == 1.0 and meta["face"]["frames"] == examined
    assert len(meta["source"]["video_sha256"]) == 64
    for frame in decoded.frames[::10]:
        (face,) = detector.detect(frame)
        x0, y0, x1, y1 = face[:4]
        assert x1 - x0 > 0.5 * 160 and y1 - y0 > 0.5 * 160  # the face fills most of the crop
        assert abs((x0 + x1) / 2 - 80) < 16 and abs((y0 + y1) / 2 - 80) < 16  # and is centred
        assert abs(face[5] - face[7]) < 6  # eyes level
