"""The DAG on your own videos: two custom datasets of the same real clips, one list with a fold column and one with
speakers only, through the real ``manifest``, ``preprocess``, ``finetune`` and ``report`` commands, in a copy of the
project that holds their ``conf/datasets`` files as a user's checkout would."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dvc_project import copy_project
from media import Portrait, scene, speech_wav, write_clip

pytestmark = pytest.mark.system

SPEAKERS = {"ann": 1, "bob": 1, "cat": 2, "dan": 2}  # speaker -> the fold the first list gives
CLASSES = ["calm", "angry"]


def write_media(root: Path) -> list[dict]:
    """Two clips per speaker, one per class: real photographs and espeak speech; the list rows."""
    rows = []
    for index, speaker in enumerate(SPEAKERS):
        for label in CLASSES:
            speech = speech_wav(root / "speech" / f"{speaker}-{label}.wav", f"This is {speaker}, feeling {label}")
            portrait = Portrait("astronaut" if index % 2 else "grace_hopper", 90 + 10 * index, 0.5, 0.45,
                                drift=0.05 if label == "angry" else 0.0)
            path = f"{speaker} takes/{label}.mp4"
            write_clip(root / path, seconds=1.2, speech=speech, frames=scene([portrait], variant=index))
            rows.append({"path": path, "label": label, "speaker": speaker, "fold": SPEAKERS[speaker]})
    return rows


def write_list(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class Project:
    """A copy of the project; ``hicmae`` runs its command line there, with its own work folder."""

    root: Path
    env: dict

    def hicmae(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "--params", "params.yaml", *args], cwd=self.root,
                              env=self.env, capture_output=True, text=True, timeout=600)

    def ok(self, *args: str) -> str:
        done = self.hicmae(*args)
        assert done.returncode == 0, f"hicmae {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return done.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_server) -> Project:
    """The project copy: ``mine`` (list with folds) and ``mine-speakers`` (folds made from speakers) over one folder
    of clips outside it, and params that train the test-size model for one epoch on fold 1."""
    root = tmp_path_factory.mktemp("project")
    copy_project(root)
    media = tmp_path_factory.mktemp("my videos")
    rows = write_media(media)
    write_list(media / "with folds.csv", rows, ["path", "label", "speaker", "fold"])
    (media / "lists").mkdir()
    write_list(media / "lists/speakers.csv", [{**row, "path": f"../{row['path']}"} for row in rows],
               ["path", "label", "speaker"])
    (root / "conf/datasets/mine.yaml").write_text(
        "adapter: custom\nlist: with folds.csv\nclasses: [calm, angry]\nfinetune: {folds: [1]}\n")
    (root / "conf/datasets/mine-speakers.yaml").write_text(
        "adapter: custom\nlist: lists/speakers.csv\nfolds: 2\nfinetune: {folds: [1]}\n")
    params = {
        "datasets": {"mine": {"root": str(media)}, "mine-speakers": {"root": str(media)}},
        "experiment": "custom-e2e",
        "preprocess": {"shard_size": 4},
        "pretrain": {"dataset": "mine", "model": {"size": "hicmae_test"}},
        "finetune": {"model": {"size": "hicmae_test"}, "init": "none", "epochs": 1, "batch_size": 2, "test_views": 1,
                     "optim": {"warmup_epochs": 0, "layer_decay": 0.75}},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5,
                    "preprocess_workers": 0},  # preprocessing without Ray (on Ray Data: test_pipeline.py)
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(HICMAE_WORKDIR=str(root / "work"), MLFLOW_TRACKING_URI=mlflow_server.url)
    return Project(root, env)


def test_a_bad_list_stops_the_manifest_stage_with_one_line_per_problem(project):
    listed = Path(yaml.safe_load((project.root / "params.yaml").read_text())["datasets"]["mine"]["root"]) / "bad.csv"
    listed.write_text("path,label,speaker,fold\nann takes/calm.mp4,calm,ann,1\nann takes/gone.mp4,calm,ann,1\n"
                      "bob takes/calm.mp4,sleepy,bob,2\nann takes/calm.mp4,calm,ann,1\n")
    conf = project.root / "conf/datasets/mine.yaml"
    good = conf.read_text()
    conf.write_text(good.replace("with folds.csv", "bad.csv"))
    try:
        done = project.hicmae("manifest", "--dataset", "mine")
    finally:
        conf.write_text(good)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"hicmae: error: {listed}:3: no such file: 'ann takes/gone.mp4'",
                                        f"{listed}:4: unknown label 'sleepy' (classes: calm, angry)",
                                        f"{listed}:5: duplicate of line 2: 'ann takes/calm.mp4'"]


def test_the_dag_fine_tunes_and_reports_with_and_without_a_fold_column(project):
    work = project.root / "work"
    for dataset in ("mine", "mine-speakers"):
        project.ok("manifest", "--dataset", dataset)
        project.ok("preprocess", "--dataset", dataset)
    for dataset in ("mine", "mine-speakers"):
        project.ok("finetune", "--dataset", dataset)
    report = project.ok("report")

    for dataset in ("mine", "mine-speakers"):
        info = json.loads((work / f"data/{dataset}/manifest.info.json").read_text())
        clips = [json.loads(line) for line in (work / f"data/{dataset}/manifest.jsonl").open()]
        assert info["name"] == dataset and info["num_folds"] == 2
        assert info["classes"] == (CLASSES if dataset == "mine" else sorted(CLASSES))  # given, or sorted
        assert sorted(clip["clip_id"] for clip in clips) == sorted(f"{s} takes/{c}.mp4" for s in SPEAKERS
                                                                   for c in CLASSES)
        assert all(len({c["fold"] for c in clips if c["speaker"] == s}) == 1 for s in SPEAKERS)
        summary = json.loads((work / f"data/{dataset}/processed/summary.json").read_text())
        assert summary["ok"] == 8, summary
        fold = work / f"runs/{dataset}/finetune/fold-1"
        test_clips = sorted(c["clip_id"] for c in clips if c["fold"] == 1)
        with (fold / "predictions_best.csv").open() as handle:
            assert sorted(row["clip_id"] for row in csv.DictReader(handle)) == test_clips
        assert json.loads((work / f"runs/{dataset}/metrics.json").read_text())["folds"] == [1]
        assert json.loads((fold / "model/model_card.json").read_text())["classes"] == info["classes"]
        assert f"| {dataset} | war |" in report
    given = {c["speaker"]: c["fold"] for c in map(json.loads, (work / "data/mine/manifest.jsonl").open())}
    assert given == SPEAKERS
    assert "2 folds as given" in (work / "data/mine/manifest.info.json").read_text()
    assert "speaker-disjoint" in (work / "data/mine-speakers/manifest.info.json").read_text()
