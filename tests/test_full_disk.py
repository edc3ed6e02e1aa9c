"""A full disk while the pipeline writes a checkpoint, a shard or the prediction table: one clear error naming the
file (or folder) and saying that the disk is full (``fileio.DiskFull``, an ``InputError``: a command prints it as one
line), and whatever was written before (the previous checkpoint, shards, rows) intact, with no temporary file left.

The disk is a real one: a small tmpfs mounted for the test (root only: skipped, with the reason, elsewhere), filled
with a ballast file so that the write in question runs out of space; the writers are the real ones, and the two
system tests run the real commands as a user does (``hicmae predict`` on Ray Data, ``hicmae pretrain`` on Ray Train).
"""

from __future__ import annotations

import csv
import errno
import gc
import json
import os
import pickle
import subprocess
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from preprocessing.errors import InputError
from preprocessing.fileio import TEMP_GLOB, DiskFull, atomic_path, write_json

DISK_BYTES = 2 * 1024 * 1024


class Disk:
    """A small filesystem of its own at ``root``; ``fill(leave)`` takes all but ``leave`` bytes of its free space,
    ``free_up()`` gives it back."""

    def __init__(self, root: Path):
        self.root = root
        self.ballast = root / "ballast"

    def fill(self, leave: int = 0) -> None:
        stats = os.statvfs(self.root)
        size = max(stats.f_bavail * stats.f_frsize - leave, 0)
        with open(self.ballast, "ab") as handle:
            handle.write(b"\0" * size)

    def free_up(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def leftovers(self) -> list[Path]:
        return sorted(self.root.rglob(TEMP_GLOB))


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, int], Disk]]:
    """``tmpfs(root, size)``: a tmpfs of ``size`` bytes mounted at ``root`` (made if need be), as a ``Disk``;
    unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    roots = []

    def mount(root: Path, size: int) -> Disk:
        root.mkdir(parents=True, exist_ok=True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        roots.append(root)
        return Disk(root)

    try:
        yield mount
    finally:
        gc.collect()  # the files a failed write left open (in its traceback's frames) are closed
        for root in reversed(roots):
            if subprocess.run(["umount", str(root)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "--lazy", str(root)], check=True)


@pytest.fixture
def disk(tmpfs, tmp_path) -> Disk:
    return tmpfs(tmp_path / "disk", DISK_BYTES)


def assert_disk_full(err: DiskFull, path: Path) -> None:
    message = str(err)
    assert message.startswith(f"{path}: no space left on the device (the disk is full)"), message
    assert "\n" not in message and isinstance(err, InputError) and err.errno == errno.ENOSPC
    again = pickle.loads(pickle.dumps(err))  # as it crosses from a Ray worker to the driver
    assert type(again) is DiskFull and str(again) == message


def test_an_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(disk):
    target = disk.root / "out" / "metrics.json"
    write_json(target, {"war": 0.5})
    before = target.read_bytes()
    disk.fill()
    with pytest.raises(DiskFull) as raised:
        write_json(target, {"war": 0.75, "per_class": list(range(2000))})
    assert_disk_full(raised.value, target)
    assert target.read_bytes() == before and disk.leftovers() == []


@pytest.mark.parametrize("into", ["file object", "path"])
def test_a_final_checkpoint_on_a_full_disk_keeps_the_previous_one(disk, into):
    """The stages' last write, ``runs/.../checkpoint.pt`` (pretrain.run_pretrain: torch.save into a file object;
    also torch.save to a path, whose short write torch reports as ``unexpected pos``)."""
    checkpoint = disk.root / "runs" / "pretrain" / "checkpoint.pt"
    old = {"model": {"w": torch.arange(1000.0)}, "epoch": 0}
    with atomic_path(checkpoint) as tmp, open(tmp, "wb") as file:
        torch.save(old, file)
    disk.fill(leave=16 * 1024)
    new = {"model": {"w": torch.randn(100_000)}, "epoch": 1}
    with pytest.raises(DiskFull) as raised:
        if into == "file object":
            with atomic_path(checkpoint) as tmp, open(tmp, "wb") as file:
                torch.save(new, file)
        else:
            with atomic_path(checkpoint) as tmp:
                torch.save(new, tmp)
    assert_disk_full(raised.value, checkpoint)
    kept = torch.load(checkpoint, weights_only=False)
    assert kept["epoch"] == 0 and torch.equal(kept["model"]["w"], old["model"]["w"])
    assert disk.leftovers() == []


def samples(count: int, size: int, seed: int) -> list[dict]:
    from preprocessing.shards import FBANK_FIELD, FRAMES_FIELD, META_FIELD

    rng = np.random.default_rng(seed)
    return [{"__key__": f"clip{i}", FRAMES_FIELD: rng.bytes(size), FBANK_FIELD: rng.bytes(size // 4),
             META_FIELD: json.dumps({"clip_id": f"clip{i}"}).encode()} for i in range(count)]


def test_a_shard_on_a_full_disk_keeps_the_previous_shard_and_index(disk):
    """The shard writer as a second preprocessing run uses it, over the shards of the first: the shard and its index
    are both written before either replaces its file."""
    from preprocessing.shard_index import check_shard, index_file, read_index, shard_file, write_shard

    shard = shard_file(disk.root / "processed", 0)
    first = write_shard(shard, samples(3, 20_000, seed=0))
    before = shard.read_bytes(), index_file(shard).read_bytes()
    disk.fill(leave=64 * 1024)
    with pytest.raises(DiskFull) as raised:
        write_shard(shard, samples(3, 60_000, seed=1))
    assert_disk_full(raised.value, shard)
    assert (shard.read_bytes(), index_file(shard).read_bytes()) == before
    check_shard(read_index(shard))  # whole, as its index says
    assert read_index(shard) == first and disk.leftovers() == []


def test_the_index_of_a_shard_finding_no_space_leaves_both_as_they_were(disk, tmp_path):
    """The new shard fits, its index does not: neither replaces its file."""
    from preprocessing.shard_index import index_file, shard_file, write_shard

    shard = shard_file(disk.root / "processed", 0)
    write_shard(shard, samples(2, 1000, seed=0))
    before = shard.read_bytes(), index_file(shard).read_bytes()
    new = samples(40, 16, seed=1)
    elsewhere = shard_file(tmp_path / "elsewhere", 0)  # the same bytes, to know their sizes
    write_shard(elsewhere, new)
    page = os.statvfs(disk.root).f_frsize
    tar_pages, index_pages = (-(-path.stat().st_size // page) for path in (elsewhere, index_file(elsewhere)))
    assert index_pages >= 2
    disk.fill(leave=(tar_pages + index_pages - 1) * page)
    with pytest.raises(DiskFull) as raised:
        write_shard(shard, new)
    assert_disk_full(raised.value, shard)  # the shard's write, which its index is part of
    failed_in = [frame.name for frame in traceback.extract_tb(raised.value.__cause__.__traceback__)]
    assert failed_in[-1] == "write_text", failed_in  # writing the index (``index_tmp.write_text``)
    assert (shard.read_bytes(), index_file(shard).read_bytes()) == before and disk.leftovers() == []


CLASSES = ["neutral", "happy"]


def names(paths) -> list[str]:
    return [Path(path).stem for path in paths]


def row(name: str, folder: Path) -> tuple[dict, dict]:
    from pipeline.predict.inputs import file_input
    from pipeline.predict.table import EMBEDDINGS

    item = file_input(folder / f"{name}.mp4")
    return ({**item.to_dict(), "status": "ok", "windows": 1,
             "clip": {"probabilities": dict.fromkeys(CLASSES, 0.5), "label": "neutral"}},
            {name: np.full(64, len(name), np.float32) for name in EMBEDDINGS})


def test_a_prediction_table_on_a_full_disk_keeps_its_rows_and_adds_the_rest_once(disk, tmp_path):
    """The JSONL and CSV on the full disk, the embeddings elsewhere: a commit that fails midway (embeddings
    appended, the JSONL not) keeps the rows committed before; committed later, the pending rows are in every file
    once."""
    from pipeline.predict.table import PredictionTable

    out, embeddings = disk.root / "predictions.csv", tmp_path / "embeddings.parquet"
    table = PredictionTable.open(out, embeddings, names=CLASSES, model="m")
    for name in ("a", "b"):
        table.add(*row(name, tmp_path))
    table.commit()
    before = out.read_bytes(), out.with_suffix(".jsonl").read_bytes()
    disk.fill()
    for name in ("c", "d"):
        table.add(*row(name, tmp_path))
    with pytest.raises(DiskFull) as raised:
        table.commit()
    assert_disk_full(raised.value, out.with_suffix(".jsonl"))
    assert (out.read_bytes(), out.with_suffix(".jsonl").read_bytes()) == before and disk.leftovers() == []
    assert names(r["path"] for r in table.rows()) == ["a", "b"]

    disk.free_up()
    table.close()
    assert names(r["path"] for r in table.rows()) == ["a", "b", "c", "d"]
    assert names(pq.read_table(embeddings).column("path").to_pylist()) == ["a", "b", "c", "d"]  # c, d once
    assert len(out.read_text().splitlines()) == 1 + 4


MODEL_CLASSES = ("neutral", "happy", "angry", "sad")  # conftest.random_classifier's


def read_table(out: Path) -> tuple[list[dict], list[dict]]:
    """The JSONL rows and the CSV rows of the table ``out``, each read strictly: a line that is not a whole row
    fails, and so does a clip twice."""
    lines = out.with_suffix(".jsonl").read_text().split("\n")
    assert lines[-1] == "", "the JSONL ends within a row"
    rows = [json.loads(line) for line in lines[:-1]]
    for row in rows:
        assert row["status"] == "ok" and set(row["clip"]["probabilities"]) == set(MODEL_CLASSES), row
    with out.open(newline="") as handle:
        table = list(csv.DictReader(handle, strict=True))
    assert all(None not in row and None not in row.values() for row in table), table  # every cell, no more
    assert [row["path"] for row in table] == [row["path"] for row in rows]
    assert len({row["path"] for row in rows}) == len(rows), "a clip twice"
    return rows, table


@pytest.mark.system
def test_hicmae_predict_into_a_table_on_a_full_disk_says_so_in_one_line(disk, demo_shards, random_classifier,
                                                                         hicmae):
    """The real ``hicmae predict`` over the demo's 15 clips (Ray Data; windows a batch at a time, so that rows come
    back as clips finish, as over many videos), its table on a disk with room for the first commit and no more. The
    first commit is of one row: the first to finish, which comes after Ray's start, later than
    ``table.COMMIT_SECONDS`` after the table was opened; the next one finds the disk full. The command exits 1 with
    one line naming the table, the committed rows whole; run again once there is space, it adds the other clips,
    each once, and leaves the first rows as they were."""
    clips = demo_shards / "raw" / "clips"
    videos = sorted(str(path) for path in clips.glob("*.mp4"))
    out = disk.root / "predictions.csv"
    page = os.statvfs(disk.root).f_frsize
    disk.fill(leave=2 * page)  # the first commit: a page of JSONL (a row), a page of CSV (the header, a row)

    def predict() -> subprocess.CompletedProcess:
        return hicmae("predict", str(clips), "--model", str(random_classifier), "--out", str(out),
                      "--batch-size", "1", "--workers", "1", timeout=300)

    failed = predict()
    assert failed.returncode == 1, failed.stderr[-3000:]
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith(f"hicmae predict: error: {out.with_suffix('.jsonl')}: no space left on the device "
                            "(the disk is full): ") and error.endswith("run again"), failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
    before, _ = read_table(out)
    assert 1 <= len(before) < len(videos), (len(before), failed.stderr[-3000:])
    assert disk.leftovers() == []

    disk.free_up()
    done = predict()
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(before)} done before, {len(videos) - len(before)} now" in done.stderr, done.stderr[-3000:]
    rows, _ = read_table(out)
    assert sorted(row["path"] for row in rows) == videos  # every clip, once
    assert rows[:len(before)] == before  # the rows of the failed run, as they were
    assert disk.leftovers() == []


def checkpoint_bytes() -> int:
    """About what a pre-training checkpoint of the test model takes: its weights and AdamW's two moments."""
    import io

    from model import HiCMAEPretrain, get_config

    model = HiCMAEPretrain(get_config("hicmae_test"))
    optimizer = torch.optim.AdamW(model.parameters())
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    return buffer.tell()


@pytest.mark.system
def test_a_ray_train_checkpoint_finding_no_space_names_where(tmpfs, demo_shards, tmp_path, hicmae):
    """The real ``hicmae pretrain`` (Ray Train, a checkpoint every epoch) with ``ray_results`` on a disk with room for
    one checkpoint and not two: the first epoch's is saved; Ray Train's copy of the second into the run's folder
    finds no space (``raytrain.report_epoch``). The command exits 1 with one line naming that folder; the first
    checkpoint is whole and the one Ray Train's record of the run holds (the same command continues from it); no
    output is written."""
    from demo_data import demo_workspace

    from pipeline.layout import CHECKPOINT_STATE
    from pipeline.train.resume import SNAPSHOT

    work = demo_workspace(demo_shards, tmp_path, pretrain={
        "dataset": "demo", "model": {"size": "hicmae_test"}, "epochs": 3, "batch_size": 2,
        "optim": {"warmup_epochs": 0}}, scaling={"num_workers": 1, "max_failures": 0})
    disk = tmpfs(work / "ray_results", 32 * 1024 * 1024)
    free = 3 * checkpoint_bytes() // 2  # a checkpoint and Ray Train's small files, not two checkpoints
    disk.fill(leave=free)

    result = hicmae("--params", str(work / "params.yaml"), "pretrain", timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    states = sorted((disk.root / "pretrain-demo").glob(f"*/checkpoint_*/{CHECKPOINT_STATE}"))  # by time
    assert states, f"no checkpoint saved: {result.stderr[-3000:]}"
    first, run = states[0], states[0].parent.parent
    assert first.stat().st_size <= free < 2 * first.stat().st_size, free  # the disk was as meant: one, not two
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"hicmae: error: {run}: no space left on the device (the disk is full): the checkpoint "
                            "of epoch 2 is not saved, and the run's earlier checkpoints are as they were") \
        and error.endswith("run again"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    state = torch.load(first, map_location="cpu", weights_only=False)  # whole: it loads
    assert state["epoch"] == 0 and len(state["history"]) == 1
    registered = json.loads((run / SNAPSHOT).read_text())["checkpoint_results"]
    assert [entry["checkpoint_dir_name"] for entry in registered] == [first.parent.name]
    assert not (work / "runs" / "pretrain" / "checkpoint.pt").exists()


def test_a_checkpoint_finding_no_space_in_its_temporary_folder_names_it(disk, monkeypatch):
    """``raytrain.report_epoch`` writes a checkpoint to a temporary folder before Ray Train copies it to the run's
    folder: with the temporary folders (``TMPDIR``) on a full disk it fails there, before anything reaches Ray, with
    one line naming that folder, which is gone."""
    import tempfile

    from pipeline.train import raytrain

    scratch = disk.root / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # as TMPDIR=scratch: where TemporaryDirectory makes them
    disk.fill(leave=64 * 1024)
    with pytest.raises(DiskFull) as raised:
        raytrain.report_epoch({"epoch": 1}, {"model": {"w": torch.randn(100_000)}, "epoch": 1})
    message = str(raised.value)
    assert message.startswith(f"{scratch}/") and "\n" not in message, message
    assert ": no space left on the device (the disk is full): the checkpoint of epoch 2 is not saved, and the run's " \
           "earlier checkpoints are as they were" in message, message
    assert list(scratch.iterdir()) == []  # the temporary folder is gone
