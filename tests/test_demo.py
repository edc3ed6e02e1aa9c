"""The embedded demo dataset: deterministic, shaped like a real one, faces detectable, classes distinct."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from preprocessing.datasets import build_manifest, demo
from preprocessing.datasets.demo_faces import Motion, pose_at

SPEAKERS, CLIPS_PER_SPEAKER = 5, 4


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset (5 speakers x 4 clips: every class once per speaker)."""
    root = tmp_path_factory.mktemp("demo")
    demo.generate_demo(root, seed=0, speakers=SPEAKERS, clips_per_speaker=CLIPS_PER_SPEAKER, workers=2)
    return root


def decode(path: Path) -> tuple[list[np.ndarray], np.ndarray, int, tuple[str, float]]:
    """All RGB frames, the mono audio samples and rate, and the video codec name and frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        video = (stream.codec_context.name, float(stream.average_rate))
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    with av.open(str(path)) as container:
        rate = container.streams.audio[0].sample_rate
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    return frames, audio, rate, video


def test_same_seed_gives_the_same_label_file_and_clip_list(tmp_path: Path) -> None:
    first = demo.generate_demo(tmp_path / "a", seed=3, speakers=5, clips_per_speaker=1, workers=1)
    second = demo.generate_demo(tmp_path / "b", seed=3, speakers=5, clips_per_speaker=1, workers=1)
    assert first == second
    assert (tmp_path / "a" / "labels.csv").read_bytes() == (tmp_path / "b" / "labels.csv").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a" / "clips").iterdir()) == \
        sorted(p.name for p in (tmp_path / "b" / "clips").iterdir())
    assert demo.labels_csv(demo.plan_clips(3, 5, 4)) == demo.labels_csv(demo.plan_clips(3, 5, 4))
    assert demo.labels_csv(demo.plan_clips(3, 5, 4)) != demo.labels_csv(demo.plan_clips(4, 5, 4))


def test_default_plan_is_100_balanced_clips_of_10_speakers() -> None:
    plans = demo.plan_clips(seed=0, speakers=10, clips_per_speaker=10)
    assert len(plans) == 100 and len({p.speaker for p in plans}) == 10
    counts = {c: sum(p.emotion == c for p in plans) for c in demo.CLASSES}
    assert counts == {c: 25 for c in demo.CLASSES}


def test_clips_are_h264_25fps_with_aac_audio(demo_root: Path) -> None:
    labels = (demo_root / "labels.csv").read_text().splitlines()
    assert labels[0] == "clip,speaker,emotion" and len(labels) == 1 + SPEAKERS * CLIPS_PER_SPEAKER
    path = demo_root / "clips" / f"{labels[1].split(',')[0]}.mp4"
    frames, audio, rate, video = decode(path)
    assert video == ("h264", 25.0)
    assert len(frames) == 70 and frames[0].shape == (256, 256, 3)
    assert rate >= 16000 and abs(len(audio) / rate - demo.DURATION) < 0.1
    assert np.abs(audio).max() > 0.05


def test_adapter_reads_the_demo_with_speaker_disjoint_folds(demo_root: Path) -> None:
    info, clips = build_manifest("demo", demo_root)
    assert info.num_folds == 5 and info.classes == demo.CLASSES
    assert len(clips) == SPEAKERS * CLIPS_PER_SPEAKER
    speakers_per_fold = {fold: {c.speaker for c in clips if c.fold == fold} for fold in range(1, 6)}
    assert all(len(s) == 1 for s in speakers_per_fold.values())
    assert all((demo_root / c.video).is_file() for c in clips)


def test_faces_are_found_by_the_face_detector(demo_root: Path, face_models: dict) -> None:
    vision = pytest.importorskip("mediapipe.tasks.python.vision")
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions

    options = vision.FaceDetectorOptions(base_options=BaseOptions(model_asset_path=face_models["short_range"]),
                                         min_detection_confidence=0.5)
    detector = vision.FaceDetector.create_from_options(options)
    try:
        for path in sorted((demo_root / "clips").glob("*.mp4"))[::5]:
            frames, *_ = decode(path)
            found = [len(detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB,
                                                  data=np.ascontiguousarray(frame))).detections)
                     for frame in frames[::7]]
            assert found == [1] * len(found), f"{path.name}: faces per frame {found}"
    finally:
        detector.close()


def test_speech_is_louder_when_angry_than_when_sad(demo_root: Path) -> None:
    rows = [line.split(",") for line in (demo_root / "labels.csv").read_text().splitlines()[1:]]
    loudness = {}
    for clip, speaker, emotion in rows:
        if speaker == "spk01":
            _, audio, _, _ = decode(demo_root / "clips" / f"{clip}.mp4")
            loudness[emotion] = float(np.sqrt(np.mean(audio ** 2)))
    assert loudness["angry"] > 2 * loudness["sad"]


def test_motion_kinds_move_the_head_differently() -> None:
    times = np.linspace(0, 2.8, 70)
    kinds = {kind: np.array([pose_at(Motion(kind, 0.1, 1.0, 0.0), t) for t in times]) for kind in
             ["zoom", "nod", "shake", "tilt"]}
    moving = {kind: tuple(int(np.ptp(poses[:, axis]) > 0) for axis in range(4))
              for kind, poses in kinds.items()}
    assert moving == {"zoom": (0, 0, 1, 0), "nod": (0, 1, 0, 0), "shake": (1, 0, 0, 0), "tilt": (0, 0, 0, 1)}
