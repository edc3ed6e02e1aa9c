"""End-to-end preprocessing: a corpus of good and bad inputs on Ray Data, resuming, idempotence."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from media import speech_wav, write_clip

from preprocessing.fileio import TEMP_GLOB
from preprocessing.manifest import ClipRecord, DatasetInfo, hash_media, write_manifest
from preprocessing.run import preprocess
from preprocessing.settings import PreprocessSettings
from preprocessing.shard_index import check_shard, list_shards, read_index, read_samples
from preprocessing.shards import ClipSample, decode_sample

PROJECT = Path(__file__).resolve().parents[1]

# clip id -> expected status
EXPECTED = {
    "good": "ok", "empty": "unreadable", "truncated": "unreadable", "text": "unreadable",
    "silent_video": "no_audio_stream", "audio_only": "no_video_stream", "no_face": "no_face",
    "too_short": "too_short", "odd_size": "ok", "rotated": "ok", "vfr": "ok", "stereo_8k": "ok",
    "odd_path": "ok", "separate_audio": "ok", "segment": "ok",
}


def processed_clips(out: Path) -> list[ClipSample]:
    """Every clip of a preprocessed folder, read through the shard indexes (each shard checked against its own)."""
    clips = []
    for path in list_shards(out):
        index = read_index(path)
        check_shard(index)
        clips += [decode_sample(raw) for raw in read_samples(index)]
    return clips


def _make_corpus(root: Path) -> list[ClipRecord]:
    speech = speech_wav(root / "speech.wav")
    good = write_clip(root / "good.mp4", seconds=1.5, speech=speech)
    (root / "empty.mp4").write_bytes(b"")
    (root / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "text.mp4").write_text("not a video, just text\n")
    write_clip(root / "silent_video.mp4", seconds=1.0)
    write_clip(root / "audio_only.m4a", seconds=1.0, speech=speech, video=False)
    write_clip(root / "no_face.mp4", seconds=1.0, speech=speech, face=False)
    write_clip(root / "too_short.mp4", seconds=0.2, speech=speech)
    write_clip(root / "odd_size.mkv", seconds=1.0, size=(97, 61), codec="ffv1", speech=speech)
    write_clip(root / "rotated.mp4", seconds=1.0, rotation=90, speech=speech)
    write_clip(root / "vfr.mp4", seconds=1.0, vfr=True, speech=speech)
    write_clip(root / "stereo_8k.mp4", seconds=1.0, speech=speech, audio_rate=8000, channels=2)
    write_clip(root / "a folder with spaces" / "Ünïcödé clip é.mp4", seconds=1.0, speech=speech)
    write_clip(root / "long.mp4", seconds=3.0, speech=speech)
    paths = {"good": "good.mp4", "empty": "empty.mp4", "truncated": "truncated.mp4", "text": "text.mp4",
             "silent_video": "silent_video.mp4", "audio_only": "audio_only.m4a", "no_face": "no_face.mp4",
             "too_short": "too_short.mp4", "odd_size": "odd_size.mkv", "rotated": "rotated.mp4",
             "vfr": "vfr.mp4", "stereo_8k": "stereo_8k.mp4",
             "odd_path": "a folder with spaces/Ünïcödé clip é.mp4"}
    clips = [ClipRecord(clip_id=clip_id, video=path, label=0, speaker=f"s{i % 3}", fold=1 + i % 2)
             for i, (clip_id, path) in enumerate(paths.items())]
    clips.append(ClipRecord(clip_id="separate_audio", video="silent_video.mp4", audio="speech.wav", label=1,
                            speaker="s1", fold=1))
    clips.append(ClipRecord(clip_id="segment", video="long.mp4", start=0.5, end=2.0, label=1, speaker="s2",
                            fold=2))
    return clips


def _manifest(tmp: Path, clips: list[ClipRecord], root: Path, num_folds: int = 0) -> Path:
    """The manifest of ``clips`` (media under ``root``, hashed as the manifest stage does)."""
    info = DatasetInfo(name="corpus", task="classification", classes=["a", "b"], num_folds=num_folds)
    return write_manifest(tmp / "corpus.jsonl", info, hash_media(clips, root))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(manifest, the media folder it is relative to)."""
    root = tmp_path_factory.mktemp("corpus")
    return _manifest(root, _make_corpus(root / "media"), root / "media", num_folds=2), root / "media"


def _status(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / "status.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len({row["clip_id"] for row in rows})
    return {row["clip_id"]: row for row in rows}


@pytest.mark.system
def test_corpus_on_ray_then_rerun_does_nothing(corpus, tmp_path):
    out = tmp_path / "out"
    settings = PreprocessSettings(shard_size=4, workers=2, cpus_per_worker=0.5, progress=False)
    summary = preprocess(corpus[0], out, corpus[1], settings)

    status = _status(out)
    assert {clip_id: row["status"] for clip_id, row in status.items()} == EXPECTED
    for row in status.values():
        if row["status"] != "ok":
            assert row["file"] and row["detail"], row
    assert summary["ok"] == 8 and summary["clips"] == len(EXPECTED)
    assert set(summary["run"]["stage_seconds"]) == {"decode", "detect", "align_crop", "fbank", "encode", "write"}
    assert json.loads((out / "summary.json").read_text()) == {k: v for k, v in summary.items() if k != "run"}
    for row in status.values():  # paths relative to the dataset folder, in the detail too
        assert str(corpus[1]) not in json.dumps(row), row

    samples = {s.meta["clip_id"]: s for s in processed_clips(out)}
    assert sorted(samples) == sorted(k for k, v in EXPECTED.items() if v == "ok")
    for sample in samples.values():
        meta = sample.meta
        assert sample.frames.shape == (meta["num_frames"], 160, 160, 3)
        assert sample.fbank.shape == (meta["fbank_frames"], 128)
        assert abs(meta["num_frames"] - meta["duration"] * 25) <= 1  # frames and fbank span the same time
        assert abs(meta["fbank_frames"] - meta["duration"] * 100) <= 3
    assert samples["rotated"].meta["source"]["rotation"] == 90
    assert samples["segment"].meta["num_frames"] in (37, 38)
    assert samples["separate_audio"].meta["source"]["audio"] == "speech.wav"

    mtimes = {path: path.stat().st_mtime_ns for path in (out / "shards").iterdir()}
    again = preprocess(corpus[0], out, corpus[1], settings)
    assert again["run"]["units_processed"] == 0
    assert {path: path.stat().st_mtime_ns for path in (out / "shards").iterdir()} == mtimes
    assert _status(out) == status


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.system
def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path):
    root = tmp_path / "media"
    speech = speech_wav(tmp_path / "speech.wav")
    clips = []
    for i in range(8):
        write_clip(root / f"clip{i}.mp4", seconds=1.0, speech=speech)
        clips.append(ClipRecord(clip_id=f"clip{i}", video=f"clip{i}.mp4", label=i % 2))
    manifest = _manifest(tmp_path, clips, root)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "preprocessing.run", "--manifest", str(manifest), "--root", str(root),
               "--out", str(out), "--shard-size", "1", "--no-ray", "--no-progress"]
    process = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    _wait_for(out / "units" / "unit-000002.json", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    finished = sorted((out / "shards").glob("shard-*.tar"))
    assert 3 <= len(finished) < 8
    for shard in finished:  # every shard under its final name is complete
        with tarfile.open(shard) as archive:
            assert len(archive.getnames()) == 3

    summary = preprocess(manifest, out, root, PreprocessSettings(shard_size=1, use_ray=False, progress=False))
    assert summary["ok"] == 8 and summary["run"]["units_processed"] <= 8 - 3
    assert not [path for path in out.rglob(TEMP_GLOB)]
    ids = [s.meta["clip_id"] for s in processed_clips(out)]
    assert sorted(ids) == [f"clip{i}" for i in range(8)]
    assert set(_status(out)) == set(ids)


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="min_face_fraction"):
        PreprocessSettings(min_face_fraction=2)


def test_changed_settings_redo_the_work(tmp_path):
    root = tmp_path / "media"
    write_clip(root / "clip.mp4", seconds=1.0, speech=speech_wav(tmp_path / "s.wav"))
    manifest = _manifest(tmp_path, [ClipRecord(clip_id="c", video="clip.mp4", label=0)], root)
    first = preprocess(manifest, tmp_path / "out", root, PreprocessSettings(use_ray=False, progress=False))
    second = preprocess(manifest, tmp_path / "out", root, PreprocessSettings(use_ray=False, progress=False, fps=30))
    assert first["run"]["units_processed"] == second["run"]["units_processed"] == 1
    (sample,) = processed_clips(tmp_path / "out")
    assert sample.meta["fps"] == 30 and sample.frames.shape[0] == 30


def test_output_depends_on_content_not_on_where_or_when(tmp_path):
    """The same media preprocessed from another folder, with other time stamps, gives the same bytes; a file whose
    content changed behind the manifest's back is a status row, and a manifest made again redoes its unit."""
    speech = speech_wav(tmp_path / "s.wav")
    first_root, second_root = tmp_path / "here" / "media", tmp_path / "elsewhere" / "copy"
    write_clip(first_root / "clip.mp4", seconds=1.0, speech=speech)
    clips = [ClipRecord(clip_id="c", video="clip.mp4", label=0)]
    outputs = []
    for root in (first_root, second_root):
        if root == second_root:
            shutil.copytree(first_root, second_root)  # new modification times
        manifest = _manifest(root.parent, clips, root)
        preprocess(manifest, root.parent / "out", root, PreprocessSettings(use_ray=False, progress=False))
        outputs.append({p.relative_to(root.parent / "out"): p.read_bytes()
                        for p in sorted((root.parent / "out").rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 5  # shard, index, unit status, status.jsonl, summary
    assert (first_root.parent / "corpus.jsonl").read_bytes() == (second_root.parent / "corpus.jsonl").read_bytes()

    manifest = second_root.parent / "corpus.jsonl"
    write_clip(second_root / "clip.mp4", seconds=1.5, speech=speech)  # replaced after the manifest was made
    settings = PreprocessSettings(use_ray=False, progress=False)
    summary = preprocess(manifest, tmp_path / "out2", second_root, settings)
    assert summary["failed"] == {"changed": 1} and "hicmae manifest" in _status(tmp_path / "out2")["c"]["detail"]
    manifest = _manifest(second_root.parent, clips, second_root)
    redone = preprocess(manifest, second_root.parent / "out", second_root, settings)
    assert redone["run"]["units_processed"] == 1 and redone["ok"] == 1


def test_a_local_ray_too_slow_to_start_is_started_again_without_its_leftovers(caplog):
    """Ray gives a local node 30 s to start; on a busy machine the first start can miss it. The processes it left
    are ended and Ray is started again once; another error, or a second miss, is raised as it is."""
    from preprocessing.ray_runtime import NODE_START_TIMEOUT, start_local

    started: list[subprocess.Popen] = []

    def slow_node():  # as ray.init: processes started, then the node misses Ray's deadline
        started.append(subprocess.Popen(["sleep", "60"]))
        if len(started) == 1:
            raise Exception(f"The current node {NODE_START_TIMEOUT}. This could happen because ...")  # noqa: TRY002

    start_local(slow_node)
    assert len(started) == 2
    assert started[0].wait(timeout=10) == -signal.SIGKILL  # the failed start's process, ended
    assert started[1].poll() is None  # the started node's, running
    started[1].kill()
    assert "starting it again (2 of 2)" in caplog.text

    def never_starts():
        started.append(subprocess.Popen(["sleep", "60"]))
        raise Exception(f"The current node {NODE_START_TIMEOUT}.")  # noqa: TRY002

    with pytest.raises(Exception, match=NODE_START_TIMEOUT):
        start_local(never_starts)
    assert len(started) == 4
    for process in started[2:]:
        process.kill()
        process.wait()

    def refused():
        raise ValueError("Failed to start GCS: InvalidAuthToken")

    with pytest.raises(ValueError, match="InvalidAuthToken"):
        start_local(refused)
