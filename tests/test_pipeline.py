"""End to end on tiny real data: demo clips -> manifest -> shards -> pretrain -> finetune 2 folds -> MLflow.

Runs the real CLI entry points on a real Ray (loopback) and a real ``mlflow server``.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from pipeline import cli
from preprocessing.datasets.demo import generate_demo

pytestmark = pytest.mark.slow

def write_params(path: Path, raw: Path, **sections) -> Path:
    params = {
        "datasets": {"demo": {"root": str(raw)}},
        "experiment": "e2e",
        "preprocess": {"shard_size": 8},
        "pretrain": {"dataset": "demo", "model": {"size": "hicmae_test"}, "epochs": 1, "batch_size": 4,
                     "optim": {"warmup_epochs": 0}},
        "finetune": {"model": {"size": "hicmae_test"}, "epochs": 2, "batch_size": 4, "folds": [1, 2],
                     "optim": {"warmup_epochs": 0, "layer_decay": 0.75}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "preprocess_workers": 2},  # DDP on gloo, as a cluster
        **sections,
    }
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("work")
    generate_demo(root / "raw", seed=0, speakers=5, clips_per_speaker=3)
    return root


def test_cli_pipeline_end_to_end_tracked_in_mlflow_server(workdir, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("HICMAE_WORKDIR", str(workdir))
    params = str(write_params(workdir / "params.yaml", workdir / "raw"))

    for argv in (["manifest", "--dataset", "demo"], ["preprocess", "--dataset", "demo"], ["pretrain"],
                 ["finetune", "--dataset", "demo"], ["report"]):
        assert cli.main(["--params", params, *argv]) == 0

    summary = json.loads((workdir / "data/demo/processed/summary.json").read_text())
    assert summary["ok"] == 15
    assert (workdir / "runs/pretrain/checkpoint.pt").is_file()
    metrics = json.loads((workdir / "runs/demo/metrics.json").read_text())
    assert metrics["folds"] == [1, 2] and "war_mean" in metrics["best"] and "uar_std" in metrics["last"]
    for fold in (1, 2):
        rows = (workdir / f"runs/demo/finetune/fold-{fold}/predictions_best.csv").read_text().splitlines()
        assert len(rows) == 1 + 3  # header + the 3 clips of the test fold's speaker
    assert (workdir / "runs/demo/finetune/plots/confusion_fold1_best.png").stat().st_size > 1000
    with np.load(workdir / "runs/demo/finetune/fold-2/embeddings_best.npz") as embeddings:  # the test clips above
        assert list(embeddings["clip_id"]) == [row.split(",")[0] for row in rows[1:]]
        assert embeddings["video"].shape == (3, 32) and embeddings["fused"].shape == (3, 128)
    history = (workdir / "runs/demo/finetune/fold-1/history.csv").read_text().splitlines()
    assert len(history) == 1 + 2 and "val/uar" in history[0]  # header + one row per epoch
    assert len((workdir / "runs/pretrain/history.csv").read_text().splitlines()) == 1 + 1
    assert "| demo | war |" in (workdir / "reports/results.md").read_text()
    for name in ("demo/confusion", "demo/embeddings", "demo/curves", "pretrain/curves"):
        assert imread(workdir / f"reports/plots/{name}.png").ndim == 3

    experiment = mlflow_server.get("experiments/get-by-name", experiment_name="e2e")["experiment"]
    runs = mlflow_server.post("runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                              "max_results": 100})["runs"]
    by_name = {run["info"]["run_name"]: run for run in runs}
    assert {"preprocess-demo", "pretrain-demo", "finetune-demo", "demo-fold1", "demo-fold2", "report"} <= set(by_name)

    parent = by_name["finetune-demo"]
    tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert tags["dvc_stage"] == "finetune" and len(tags["git_commit"]) >= 7 and tags["data_hash"]
    for fold in (1, 2):  # every exported model names the data it was trained on, as the run does
        card = json.loads((workdir / f"runs/demo/finetune/fold-{fold}/model/model_card.json").read_text())
        assert card["data_hash"] == tags["data_hash"]
    assert {m["key"] for m in parent["data"]["metrics"]} >= {"test/war_mean", "test/uar_std"}
    params_logged = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params_logged["epochs"] == "2" and params_logged["protocol"] == "clean"
    for fold in (1, 2):
        child = by_name[f"demo-fold{fold}"]
        child_tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        assert child_tags["mlflow.parentRunId"] == parent["info"]["run_id"]
        assert child["info"]["status"] == "FINISHED"
        assert "test/war" in {m["key"] for m in child["data"]["metrics"]}
        history = mlflow_server.get("metrics/get-history", run_id=child["info"]["run_id"], metric_key="train/loss")
        assert [m["step"] for m in history["metrics"]] == [0, 1]
    artifacts = mlflow_server.get("artifacts/list", run_id=parent["info"]["run_id"], path="plots")
    assert any(f["path"].endswith("confusion_fold1_best.png") for f in artifacts["files"])
    report = mlflow_server.get("artifacts/list", run_id=by_name["report"]["info"]["run_id"], path="plots/demo")
    assert {f["path"] for f in report["files"]} == {f"plots/demo/{n}.png"
                                                     for n in ("confusion", "embeddings", "curves", "faces")}
