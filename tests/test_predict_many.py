"""Prediction over many videos: the real ``hicmae predict`` command on a folder and a clip list of real clips (two of
them broken) with 2 Ray workers, SIGKILLed mid-run and run again; every input has exactly one row, and the
probabilities and embeddings equal single-video ``predict``'s."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from media import speech_wav, write_clip

from pipeline import cli
from pipeline.predict.inputs import collect_inputs
from pipeline.predict.table import EMBEDDINGS, PredictionTable, TableError, csv_columns, csv_text
from pipeline.predict.video import predict

CLASSES = ["neutral", "happy", "angry", "sad"]  # conftest.random_classifier's
GOOD = [f"talks/clip{i}.mp4" for i in range(6)] + ["talks/three seconds.mp4", "talks/more/in a folder.mkv"]
BROKEN = {"talks/broken.mp4": "unreadable: not a media file PyAV can open", "talks/silent.mp4": "no_audio_stream: "}
SEGMENTS = ["long.mp4@0-3.5", "long.mp4@3.5-end"]
TOLERANCE = 1e-5  # batch vs single-video outputs and embeddings, absolute (float32, batches of other windows)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """talks/: 8 clips (one 3 s, two windows; one in a sub-folder with spaces, .mkv), a text file named .mp4, a clip
    without sound and a hidden file; more/list.csv: two segments of a 6 s clip and talks/clip0.mp4 again."""
    root = tmp_path_factory.mktemp("videos")
    speech = speech_wav(root / "speech.wav", "Well, that is a surprise. I did not expect it at all")
    for index, name in enumerate(GOOD):
        write_clip(root / name, seconds=3.0 if "three" in name else 1.0 + 0.1 * index, speech=speech,
                   size=(320, 240) if index % 2 else (256, 320))
    (root / "talks/broken.mp4").write_text("this is not a video\n")
    write_clip(root / "talks/silent.mp4", seconds=1.0, speech=None)
    (root / "talks/._clip0.mp4").write_bytes(b"\0\5\26\7")  # a macOS shadow file: hidden, not an input
    write_clip(root / "long.mp4", seconds=6.0, speech=speech)
    (root / "more").mkdir()
    (root / "more/list.csv").write_text("path,start,end\n../long.mp4,0,3.5\n../long.mp4,3.5,\n../talks/clip0.mp4,,\n")
    return root


@pytest.fixture(scope="module")
def model(random_classifier) -> Path:
    return random_classifier


def command(model: Path, *extra: str) -> list[str]:
    script = Path(sys.executable).with_name("hicmae")
    start = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    return [*start, "predict", "talks", "more/list.csv", "--model", str(model), "--out", "out/predictions.csv",
            "--embeddings", "out/embeddings.parquet", "--workers", "2", *extra]


def read_outputs(root: Path) -> tuple[list[dict], list[dict], dict[str, dict]]:
    """The JSONL rows, the CSV rows and the embeddings by id, each read strictly (a partial line would fail)."""
    lines = (root / "out/predictions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    with (root / "out/predictions.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    parquet = root / "out/embeddings.parquet"
    embeddings = pq.read_table(parquet).to_pylist() if parquet.exists() else []  # none until an ok row
    by_id = {row["id"]: row for row in embeddings}
    assert len(by_id) == len(embeddings), "an embedding row twice"
    return rows, table, by_id


def kill_after_first_rows(root: Path, model: Path) -> tuple[int, str]:
    """Start the command, SIGKILL it as soon as its table has a committed row, then end what it left running."""
    with open(root / "killed.log", "w") as log:
        process = subprocess.Popen(command(model, "--batch-size", "1"), cwd=root, stdout=log, stderr=log)
    table = root / "out/predictions.jsonl"
    deadline = time.monotonic() + 300
    while not (table.exists() and table.read_text()) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = psutil.Process(process.pid).children(recursive=True)
    process.kill()
    process.wait()
    for child in tree:  # the local Ray it started, killed by pid
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    return process.returncode, (root / "killed.log").read_text()


@pytest.fixture(scope="module")
def batch_run(videos, model) -> dict:
    """The command killed after its first rows, what it left, then run again to the end."""
    returncode, killed_log = kill_after_first_rows(videos, model)
    assert returncode == -9, killed_log[-3000:]
    left = read_outputs(videos)
    done = subprocess.run(command(model), cwd=videos, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"left": left, "final": read_outputs(videos), "stderr": done.stderr}


@pytest.mark.system
def test_a_killed_run_leaves_whole_rows_and_the_next_run_completes_it(batch_run):
    rows, table, embeddings = batch_run["left"]
    assert 1 <= len(rows) < 12, "the kill came too late to test resuming"
    assert len({row["id"] for row in rows}) == len(rows)
    assert [r["id"] for r in table] == [r["id"] for r in rows][:len(table)]  # the CSV is renamed after the JSONL
    assert {row["id"] for row in rows if row["status"] == "ok"} <= set(embeddings)

    final, final_table, final_embeddings = batch_run["final"]
    assert f"{len(rows)} done before, {12 - len(rows)} now" in batch_run["stderr"]
    assert final[:len(rows)] == rows  # nothing committed before the kill was lost or changed
    assert sorted(row["id"] for row in final) == sorted(GOOD + list(BROKEN) + SEGMENTS)  # every input, once
    assert [row["id"] for row in final_table] == [row["id"] for row in final]
    assert sorted(final_embeddings) == sorted(GOOD + SEGMENTS)  # one per ok input, none for the broken ones


@pytest.mark.system
def test_every_input_has_its_row_and_the_broken_ones_say_why(batch_run, videos):
    final, table, _ = batch_run["final"]
    by_id = {row["id"]: row for row in final}
    for name, status in BROKEN.items():
        assert by_id[name]["status"].startswith(status) and "\n" not in by_id[name]["status"]
        assert by_id[name]["windows"] == 0 and "clip" not in by_id[name]
    for name in GOOD + SEGMENTS:
        row = by_id[name]
        assert row["status"] == "ok" and row["path"] == str(videos / name.split("@")[0])
        assert row["windows"] == len(row["window_outputs"]) == (2 if name in ("talks/three seconds.mp4",
                                                                              "long.mp4@0-3.5") else 1)
        assert row["face"]["fraction"] > 0.9 and set(row["seconds"]) >= {"decode", "detect", "model"}
        assert sum(row["clip"]["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert (by_id["long.mp4@0-3.5"]["start"], by_id["long.mp4@3.5-end"]["end"]) == (0, None)
    assert by_id["long.mp4@3.5-end"]["window_outputs"][0]["start"] == 3.5  # times in the source file
    assert list(table[0]) == csv_columns(CLASSES)
    flat = {row["id"]: row for row in table}
    assert flat["talks/clip1.mp4"]["label"] == by_id["talks/clip1.mp4"]["clip"]["label"]
    assert float(flat["talks/clip1.mp4"]["happy"]) == by_id["talks/clip1.mp4"]["clip"]["probabilities"]["happy"]
    assert flat["talks/silent.mp4"]["label"] == "" and flat["talks/silent.mp4"]["windows"] == "0"
    stderr = batch_run["stderr"]
    assert "clips/s" in stderr and "failed=2" in stderr and "12 inputs: 10 ok, 2 failed" in stderr
    assert "Traceback" not in stderr and "INFO" not in stderr


@pytest.mark.system
def test_outputs_and_embeddings_equal_single_video_prediction(batch_run, videos, model, tmp_path):
    _, _, embeddings = batch_run["final"]
    by_id = {row["id"]: row for row in batch_run["final"][0]}
    for name in ("talks/clip0.mp4", "talks/three seconds.mp4", "talks/more/in a folder.mkv"):
        single = predict(videos / name, model, embeddings=tmp_path / "one.parquet")
        one = pq.read_table(tmp_path / "one.parquet").to_pylist()[0]
        assert one["path"] == str(videos / name)
        windows = [list(w["probabilities"].values()) for w in single["windows"]]
        batch_windows = [list(w["probabilities"].values()) for w in by_id[name]["window_outputs"]]
        np.testing.assert_allclose(batch_windows, windows, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(list(by_id[name]["clip"]["probabilities"].values()),
                                   list(single["clip"]["probabilities"].values()), atol=TOLERANCE, rtol=0)
        assert [w["frames"] for w in by_id[name]["window_outputs"]] == [w["frames"] for w in single["windows"]]
        for embedding in EMBEDDINGS:
            assert len(one[embedding]) == {"video": 32, "audio": 32, "fused": 128}[embedding]
            np.testing.assert_allclose(embeddings[name][embedding], one[embedding], atol=TOLERANCE, rtol=0)


@pytest.mark.system
def test_a_finished_table_is_not_predicted_again(batch_run, videos, model):
    before = (videos / "out/predictions.jsonl").read_bytes()
    done = subprocess.run(command(model), cwd=videos, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "12 done before, 0 now" in done.stderr
    assert (videos / "out/predictions.jsonl").read_bytes() == before


# --- inputs, the table and the command's errors, without Ray -----------------------------------------------------

def test_folders_and_lists_give_each_file_and_segment_once(videos, monkeypatch):
    monkeypatch.chdir(videos)
    inputs = collect_inputs(["talks", "more/list.csv", "./talks/clip1.mp4", "nowhere.mp4"])
    assert [item.id for item in inputs] == sorted(GOOD + list(BROKEN)) + SEGMENTS + ["nowhere.mp4"]
    assert inputs[-1].path == str(videos / "nowhere.mp4")
    segment = inputs[-2]
    assert (segment.path, segment.start, segment.end) == (str(videos / "long.mp4"), 3.5, None)
    (videos / "bad.csv").write_text("file\nx.mp4\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: no column 'path' \(columns: file\)"):
        collect_inputs(["bad.csv"])


def test_a_table_reopened_after_a_kill_drops_what_a_commit_left_half_done(tmp_path):
    from pipeline.predict.inputs import file_input

    items = [file_input(tmp_path / f"{name}.mp4") for name in "abc"]
    rows = [{**item.to_dict(), "status": "ok", "windows": 1,
             "clip": {"probabilities": dict.fromkeys(CLASSES, 0.25), "label": "neutral"}} for item in items]
    embedding = {name: np.ones(4, np.float32) for name in EMBEDDINGS}
    table = PredictionTable.open(tmp_path / "p.csv", tmp_path / "e.parquet", names=CLASSES, model="m1")
    table.add(rows[0], embedding)
    table.add({**rows[1], "status": "unreadable: no such file", "windows": 0, "clip": None})
    table.commit()
    # as a kill between two renames leaves it: c's embeddings, no row; a row twice (a hand-edited file)
    table.pending = [(rows[2], embedding)]
    table.jsonl.write_text(table.jsonl.read_text() + table.jsonl.read_text().splitlines()[0] + "\n")
    from pipeline.predict.table import append_parquet, embeddings_table
    append_parquet(table.embeddings, embeddings_table([items[2]], [embedding]))

    again = PredictionTable.open(tmp_path / "p.csv", tmp_path / "e.parquet", names=CLASSES, model="m1")
    assert [again.done(item.key()) for item in items] == [True, True, False]
    assert [row["id"] for row in again.rows()] == [items[0].id, items[1].id]
    assert pq.read_table(tmp_path / "e.parquet").column("id").to_pylist() == [items[0].id]
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 2
    with pytest.raises(TableError, match=r"p.jsonl:1: a prediction of another model \(m1, not m2\)"):
        PredictionTable.open(tmp_path / "p.csv", None, names=CLASSES, model="m2")


def test_a_regression_model_has_a_table_column_per_target():
    row = {"id": "a.mp4", "path": "/v/a.mp4", "start": None, "end": None, "status": "ok", "duration": 3.1, "windows": 2,
           "clip": {"values": {"valence": 0.5, "arousal": -0.25}},
           "face": {"frames": 78, "detected": 70, "fraction": 0.8974, "tracks": 1, "cuts": 0}}
    flat = next(csv.DictReader(csv_text([row], ["valence", "arousal"], header=True).splitlines()))
    assert flat == {"id": "a.mp4", "path": "/v/a.mp4", "start": "", "end": "", "status": "ok", "label": "",
                    "valence": "0.5", "arousal": "-0.25", "duration": "3.1", "windows": "2", "face_frames": "78",
                    "face_detected": "70", "face_fraction": "0.8974", "face_tracks": "1", "face_cuts": "0"}
    with pytest.raises(TableError, match=r"outputs named \['status'\] clash"):
        csv_columns(["status", "calm"])


def test_the_command_refuses_a_preview_or_no_table_for_many_videos(videos, model, monkeypatch, capsys):
    monkeypatch.chdir(videos)
    for extra, message in ((["--out", "x.csv", "--preview", "p.png"], "--preview draws one video"),
                           ([], "give --out predictions.csv"), (["--out", "x.txt"], "x.txt: the predictions table")):
        assert cli.main(["predict", "talks", "long.mp4", "--model", str(model), *extra]) == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error, error
