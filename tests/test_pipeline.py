"""End to end on tiny real data: demo clips -> manifest -> shards -> pretrain -> finetune 2 folds -> MLflow.

The run is ``conftest.demo_run`` (tests/demo_run.py): the real command (``python -m pipeline.cli``, a process of its
own as a user's) on a real Ray (loopback) and a real ``mlflow server``, with 2 Ray Train workers (DDP on gloo) and
both folds at once. These tests read what it printed: a header, each epoch's line once per fold, progress within
epochs, a summary with the fold metrics and nothing of the libraries' internals (``--verbose`` shows those:
tests/test_preemption.py); the log file and MLflow keep them, with step-level curves.

While the stages ran, every socket their process trees listened on was recorded: a local Ray really is local (with
no ``RAY_ADDRESS``, the GCS, raylet, object manager, dashboard and its agents, each worker's gRPC server, Ray Data's
actors, Ray Train's workers and their gloo rendezvous all listen on the loopback interface only).
"""

import json
import re

import numpy as np
import pytest
import torch
from demo_run import EPOCHS, FOLDS, is_loopback
from matplotlib.image import imread

from pipeline.train.export import init_weights

pytestmark = pytest.mark.system

MAX_LINES = 47  # the console of the five stages, besides the progress lines within epochs (2: models registered)
STEPS = {"pretrain demo": 3, "demo fold 1": 2, "demo fold 2": 2}  # per epoch: 15 clips / 4, 9 training clips / 4
NOISE = ("Checkpoint successfully created", "Reporting training result", "TrainController", "RayTrainWorker",
         "Requesting resources", "loaded 162 tensors from", "missing (kept their init):", "constructor arguments",
         "Progress bars disabled", "Token authentication is enabled", "Starting execution of Dataset",
         "FaceDetector.__del__", "Traceback", "INFO mlflow", "[repeated", "is empty", '"confusion_matrix"',
         "View run", "core_worker.cc")


def test_cli_pipeline_end_to_end_tracked_in_mlflow_server(demo_run, demo_run_mlflow):
    mlflow_server = demo_run_mlflow  # the store the run logged to, served again (conftest.demo_run_mlflow)
    workdir, console, sockets = demo_run.work, demo_run.console, demo_run.sockets
    check_console(console)

    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names and len(sockets) >= 10, sockets  # the Ray sessions were seen
    exposed = sorted(socket for socket in sockets if not is_loopback(socket[0]))
    assert not exposed, f"listening beyond loopback: {exposed}"

    summary = json.loads((workdir / "data/demo/processed/summary.json").read_text())
    assert summary["ok"] == 15
    assert (workdir / "runs/pretrain/checkpoint.pt").is_file()
    exported, saved = (init_weights(workdir / "runs/pretrain" / name) for name in ("model", "checkpoint.pt"))
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)  # the same
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
    assert len((workdir / "runs/pretrain/history.csv").read_text().splitlines()) == 1 + EPOCHS
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
    assert params_logged["variant"] == "baseline"
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]

    def inputs(run: dict) -> dict[str, tuple[str, str]]:  # its MLflow datasets: name -> (digest, context)
        return {item["dataset"]["name"]: (item["dataset"]["digest"], item["tags"][0]["value"])
                for item in run.get("inputs", {}).get("dataset_inputs", [])}

    checkpoint = next(t["value"] for t in by_name["pretrain-demo"]["data"]["tags"] if t["key"] == "checkpoint_sha256")
    for name, expected in (("pretrain-demo", {"demo": (tags["data_hash"], "training")}),
                           ("finetune-demo", {"demo": (tags["data_hash"], "training"),
                                              "runs/pretrain/checkpoint.pt": (checkpoint, "init")})):
        found = inputs(by_name[name])
        assert found.keys() == expected.keys(), (name, found)
        for dataset, (digest, context) in found.items():  # the digest: the hash's first characters
            assert len(digest) >= 8 and expected[dataset][0].startswith(digest), (name, found)
            assert context == expected[dataset][1], (name, found)
    assert [context for _, context in inputs(by_name["preprocess-demo"]).values()] == ["preprocessing"]
    assert [context for _, context in inputs(by_name["report"]).values()] == ["report"]
    for fold in (1, 2):
        child = by_name[f"demo-fold{fold}"]
        child_tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        assert child_tags["mlflow.parentRunId"] == parent["info"]["run_id"]
        assert {p["key"]: p["value"] for p in child["data"]["params"]} == {**params_logged, "fold": str(fold)}
        assert inputs(child) == inputs(parent)
        assert child["info"]["status"] == "FINISHED"
        assert "test/war" in {m["key"] for m in child["data"]["metrics"]}
        [version] = registered_from(mlflow_server, child)  # the fold's model, logged and registered in its run
        assert version["name"] == "hicmae-demo" and {"key": "fold", "value": str(fold)} in version["tags"]
        history = mlflow_server.get("metrics/get-history", run_id=child["info"]["run_id"], metric_key="train/loss")
        assert [m["step"] for m in history["metrics"]] == [0, 1]
    artifacts = mlflow_server.get("artifacts/list", run_id=parent["info"]["run_id"], path="plots")
    assert any(f["path"].endswith("confusion_fold1_best.png") for f in artifacts["files"])
    report = mlflow_server.get("artifacts/list", run_id=by_name["report"]["info"]["run_id"], path="plots/demo")
    assert {f["path"] for f in report["files"]} == {f"plots/demo/{n}.png"
                                                     for n in ("confusion", "embeddings", "curves", "faces")}
    for name, label in (("pretrain-demo", "pretrain demo"), ("demo-fold1", "demo fold 1")):
        steps = mlflow_server.get("metrics/get-history", run_id=by_name[name]["info"]["run_id"],
                                  metric_key="train_step/loss")["metrics"]  # step-level: every step, at so few
        assert sorted(point["step"] for point in steps) == list(range(1, EPOCHS * STEPS[label] + 1)), name
        began, ended = (int(by_name[name]["info"][key]) for key in ("start_time", "end_time"))
        assert all(began <= int(point["timestamp"]) <= ended for point in steps), (name, steps)  # real time, not 0
    files = mlflow_server.get("artifacts/list", run_id=parent["info"]["run_id"])["files"]
    assert "finetune-demo.log" in {item["path"] for item in files}
    assert [version["name"] for version in registered_from(mlflow_server, by_name["pretrain-demo"])] == [
        "hicmae-pretrain-demo"]
    log = (workdir / "logs" / "finetune-demo.log").read_text()
    assert "tensors loaded" in log and "missing" in log and "unexpected" in log  # the checkpoint's names, here


def registered_from(server, run: dict) -> list[dict]:
    """The Model Registry's versions of models logged in ``run`` (``pipeline.registry``)."""
    found = server.get("model-versions/search", filter=f"run_id = '{run['info']['run_id']}'")
    return found.get("model_versions", [])


def check_console(console: list[str]) -> None:
    """What the five stages printed: short, each epoch once per fold, a summary, none of the libraries' noise."""
    text = "\n".join(console)
    progress = [line for line in console if re.search(r": epoch \d+/\d+  step ", line)]
    assert len(console) - len(progress) <= MAX_LINES, text
    for noise in NOISE:
        assert noise not in text, f"{noise!r} on the console:\n{text}"
    for run, steps in STEPS.items():  # a line at every step but an epoch's last (show_every_s above)
        assert len([line for line in progress if line.startswith(f"{run}: ")]) == EPOCHS * (steps - 1), text
    assert re.search(r"^pretrain demo: HiCMAE hicmae_test .*2 workers on cpu", text, re.M), text
    assert re.search(r"^finetune demo: folds 1, 2 of 5, 2 at a time", text, re.M), text
    for fold in FOLDS:
        for epoch in range(1, EPOCHS + 1):
            lines = [line for line in console if line.startswith(f"demo fold {fold}: epoch {epoch}/{EPOCHS}  train")]
            assert len(lines) == 1, (fold, epoch, text)
    summary = text[text.index("test fold"):]
    for fold in FOLDS:
        assert re.search(rf"^ +{fold} +\d+\.\d", summary, re.M), summary
    assert re.search(r"mean ± std +\d+\.\d ± \d+\.\d", summary), summary
    assert "runs/demo/metrics.json" in text and "logs/finetune-demo.log" in text
