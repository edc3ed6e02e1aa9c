"""A full disk while the pipeline writes a checkpoint, a shard or the prediction table: one clear error naming the
file (or folder) and saying that the disk is full (``fileio.DiskFull``, an ``InputError``: a command prints it as one
line), and whatever was written before (the previous checkpoint, shards, rows) intact, with no temporary file left.

The disk is a real one: a 2 MiB tmpfs mounted for the test (root only: skipped, with the reason, elsewhere), filled
with a ballast file so that the write in question runs out of space; the writers are the real ones.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import pickle
import subprocess
import traceback
from pathlib import Path
from types import SimpleNamespace

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
def disk(tmp_path) -> Disk:
    root = tmp_path / "disk"
    root.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(root)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield Disk(root)
    finally:
        gc.collect()  # the files a failed write left open (in its traceback's frames) are closed
        if subprocess.run(["umount", str(root)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(root)], check=True)


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


def test_hicmae_predict_into_a_table_on_a_full_disk_says_so_in_one_line(disk, tmp_path, monkeypatch, capsys):
    """The real ``hicmae predict`` over many videos (the Ray Data pipeline replaced by one that yields each input's
    row): the disk fills up during the second run; the command prints one line naming the table and exits 1, the
    rows of the first run intact; run again once there is space, it adds the rest."""
    from model import HiCMAEClassifier, get_config
    from pipeline import cli
    from pipeline.predict import many
    from pipeline.train.export import export_model
    from preprocessing.manifest import DatasetInfo

    cfg = get_config("hicmae_test")
    model = export_model(HiCMAEClassifier(cfg, len(CLASSES)).state_dict(), cfg,
                         DatasetInfo(name="mine", task="classification", classes=CLASSES), {}, None,
                         tmp_path / "model")
    videos = tmp_path / "videos"
    videos.mkdir()
    fill_during_run = []

    def pipeline(todo, *args, **kwargs):
        if fill_during_run:
            disk.fill()
        for index, item in enumerate(todo):
            yield index, row(Path(item.path).stem, videos)[0], None

    monkeypatch.setattr(many, "run_pipeline", pipeline)
    monkeypatch.setattr(many, "ensure_face_models", lambda *args: None)
    monkeypatch.setattr("pipeline.predict.table.COMMIT_SECONDS", 0.0)  # a commit after every row
    out = disk.root / "predictions.csv"

    def predict(*names: str) -> int:
        for name in names:
            (videos / f"{name}.mp4").touch()
        return cli.main(["predict", *(str(videos / f"{name}.mp4") for name in names), "--model", str(model),
                         "--out", str(out)])

    assert predict("a", "b") == 0
    before = out.read_bytes(), out.with_suffix(".jsonl").read_bytes()
    capsys.readouterr()
    fill_during_run.append(True)
    assert predict("a", "b", "c", "d") == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"hicmae predict: error: {out.with_suffix('.jsonl')}: no space left on the device "
                            "(the disk is full)"), error
    assert (out.read_bytes(), out.with_suffix(".jsonl").read_bytes()) == before and disk.leftovers() == []

    disk.free_up()
    fill_during_run.clear()
    assert predict("a", "b", "c", "d") == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert names(r["path"] for r in rows) == ["a", "b", "c", "d"]


def test_a_ray_train_checkpoint_finding_no_space_names_where(disk, tmp_path, monkeypatch):
    """``raytrain.report_epoch``: the checkpoint goes to a temporary folder first (full: the error names it), then
    Ray Train copies it to the run's storage folder (full: the error names the storage; the run's earlier checkpoint
    stays whole). Ray Train's own copy (``StorageContext.persist_current_checkpoint``, what ``ray.train.report``
    does with a checkpoint on a worker) runs here without a Ray cluster."""
    import tempfile

    import ray.train
    from ray.train.v2._internal.execution.storage import StorageContext

    from pipeline.layout import CHECKPOINT_STATE
    from pipeline.train import raytrain

    storage = StorageContext(str(disk.root / "ray_results"), "pretrain-demo")
    storage._create_validation_file()  # as the run's controller does when it starts
    saved = []

    def report(metrics, checkpoint=None, checkpoint_dir_name=None):
        saved.append(storage.persist_current_checkpoint(checkpoint, f"checkpoint_{len(saved):06d}"))

    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_storage=lambda: storage))
    state = {"model": {"w": torch.randn(50_000)}, "epoch": 0}
    raytrain.report_epoch({"epoch": 0}, state)
    first = Path(saved[0].path) / CHECKPOINT_STATE
    before = first.read_bytes()

    disk.fill(leave=64 * 1024)
    with pytest.raises(DiskFull) as raised:
        raytrain.report_epoch({"epoch": 1}, {**state, "epoch": 1})
    assert str(raised.value).startswith(f"{storage.experiment_fs_path}: no space left on the device (the disk is "
                                        "full): the checkpoint of epoch 2 is not saved, and the run's earlier "
                                        "checkpoints are as they were"), str(raised.value)
    assert first.read_bytes() == before and len(saved) == 1

    scratch = disk.root / "tmp"
    scratch.mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where TemporaryDirectory makes its folders
    with pytest.raises(DiskFull) as raised:
        raytrain.report_epoch({"epoch": 1}, {**state, "epoch": 1})
    assert str(raised.value).startswith(f"{scratch}/"), str(raised.value)
    assert "the checkpoint of epoch 2 is not saved" in str(raised.value) and len(saved) == 1
    assert list(scratch.iterdir()) == []  # the temporary folder is gone
