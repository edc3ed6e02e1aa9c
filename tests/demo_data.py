"""The tiny demo the training tests share: its clips and preprocessing, and work folders over its shards.

    work = demo_workspace(demo_shards, tmp_path / "work", finetune={...}, scaling={...})   # demo_shards: a fixture
    cli.main(["--params", str(work / "params.yaml"), "finetune", "--dataset", "demo"])   # HICMAE_WORKDIR=work

``conftest.demo_shards`` makes the clips, manifest and shards once a test run.
"""

from __future__ import annotations

from pathlib import Path

import yaml

DEMO_CLIPS = {"seed": 0, "speakers": 5, "clips_per_speaker": 3}  # 15 clips, 3 a speaker: 5 speaker-disjoint folds
DEMO_PREPROCESS = {"shard_size": 8}  # 2 shards


def demo_params(path: Path, demo: Path, **sections) -> Path:
    """A params.yaml over the shared demo (its clips and preprocessing) with the test's own ``sections``."""
    params = {"datasets": {"demo": {"root": str(demo / "raw")}}, "preprocess": dict(DEMO_PREPROCESS), **sections}
    path.write_text(yaml.safe_dump(params))
    return path


def demo_workspace(demo: Path, work: Path, **sections) -> Path:
    """A work folder of its own on the shared demo's shards (linked, read-only by convention) with a params.yaml of
    ``sections``; returns ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "data").symlink_to(demo / "data")
    demo_params(work / "params.yaml", demo, **sections)
    return work
