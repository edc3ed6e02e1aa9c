"""A damaged shard (here: cut short, as a full disk or an interrupted copy leaves it) is caught, not retried:
training stops at once with one line naming it, and preprocessing run again redoes exactly that shard."""

from __future__ import annotations

import json
import shutil

import pytest
from demo_data import DEMO_CLIPS, DEMO_PREPROCESS

from preprocessing.fileio import sha256_file

pytestmark = pytest.mark.system


def test_a_truncated_shard_stops_training_in_one_line_and_preprocessing_redoes_it(hicmae, tmp_path, demo_shards):
    shutil.copytree(demo_shards / "data", tmp_path / "data")  # a copy of the shared demo's manifest and shards
    settings = ["--set", f"datasets.demo.root={demo_shards / 'raw'}",
                "--set", f"preprocess.shard_size={DEMO_PREPROCESS['shard_size']}",
                "--set", "scaling.preprocess_workers=0", "--set", "finetune.init=none"]
    shards = sorted((tmp_path / "data/demo/processed/shards").glob("shard-*.tar"))
    assert len(shards) == 2
    whole = {shard: sha256_file(shard) for shard in shards}
    untouched = shards[1].stat().st_mtime_ns
    damaged = shards[0]
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[: size // 2])

    for stage in (["finetune", "--dataset", "demo"], ["pretrain"]):
        result = hicmae(*settings, "--set", "pretrain.dataset=demo", *stage)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert lines == [f"hicmae: error: {damaged}: damaged: {size // 2} bytes, its index records {size}; "
                         "run `hicmae preprocess --dataset demo` again to redo it"], result.stderr
        assert not (tmp_path / "ray_results").exists()  # stopped before any Ray Train run (and its retries)

    redo = hicmae(*settings, "preprocess", "--dataset", "demo")
    assert redo.returncode == 0, redo.stderr
    summary = json.loads((tmp_path / "data/demo/processed/summary.json").read_text())
    assert summary["ok"] == DEMO_CLIPS["speakers"] * DEMO_CLIPS["clips_per_speaker"]
    assert shards[1].stat().st_mtime_ns == untouched  # the damaged unit alone, redone
    assert {shard: sha256_file(shard) for shard in shards} == whole   # the same bytes as before the damage
