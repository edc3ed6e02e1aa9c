"""The tracking server is never on the training path, as a user meets it: the real command pre-trains the tiny demo on
2 Ray Train workers while its ``mlflow server`` is killed and, a while later, started again on the same port and
store. Training does not wait for it, the console says that tracking fell behind and caught up, every step's
metrics reach the run, and the weights are those of the same run with no server to lose. A stage whose tracking
server is not there fails at once, with one line, before any work.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from demo_data import demo_workspace
from mlflow_server import free_port, running_mlflow_server

pytestmark = pytest.mark.system

PROJECT = Path(__file__).resolve().parents[1]
EPOCHS, STEPS = 10, 3  # the demo's 15 clips, 2 a batch on each of 2 workers: 3 steps an epoch
STEP_KEYS = ("loss", "loss_video", "loss_audio", "loss_contrastive", "lr", "samples_per_s")  # train_step/<key>
KILL_AT = re.compile(rf"(?m)^pretrain demo: epoch 2/{EPOCHS}  step 1/{STEPS} ")  # the server dies once this is shown
PAUSE_S = 4.0  # between the kill and the restart: several log intervals (a point every step, ~0.5 s a step)
# The server takes seconds to start again (half a minute on a busy machine), maybe more than the run has left: rank 0
# then waits for it at the end of its training, as long as this allows.
FLUSH_S = 120
TIMEOUT_S = 300
PARAMS = {
    "experiment": "outage",
    "pretrain": {"dataset": "demo", "model": {"size": "hicmae_test"}, "epochs": EPOCHS, "batch_size": 2,
                 "optim": {"warmup_epochs": 0}},
    "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
    "progress": {"show_every_s": 0.01, "log_every_steps": 1},
}


def environment(work: Path, tracking_uri: str) -> dict:
    """The command's environment: this one without Ray's settings of other tests, in ``work``, tracking there."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    return {**env, "HICMAE_WORKDIR": str(work), "MLFLOW_TRACKING_URI": tracking_uri,
            "HICMAE_TRACKING_FLUSH_S": str(FLUSH_S)}


def wall_ms() -> int:
    return int(time.time() * 1000)


class Outage:
    """When the server went down and when it answered again (ms since 1970)."""

    began = ended = 0


def pretrain_through_an_outage(work: Path, server) -> tuple[subprocess.CompletedProcess, Outage]:
    """``hicmae pretrain`` in ``work``; once its second epoch has begun, the server's whole process group is killed
    (SIGKILL), and started again ``PAUSE_S`` later. Returns the finished command (its output in ``stdout``) and the
    outage."""
    outage, output = Outage(), work / "pretrain.out"  # a file, not a pipe: read while the command runs
    with open(output, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--params", str(work / "params.yaml"),
                                    "pretrain"], cwd=PROJECT, env=environment(work, server.url), stdout=sink,
                                   stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not outage.began and process.poll() is None and time.monotonic() < deadline:
            if KILL_AT.search(output.read_text()):
                server.stop(signal.SIGKILL)
                outage.began = wall_ms()
                time.sleep(PAUSE_S)
                server.start()
                outage.ended = wall_ms()
            time.sleep(0.05)
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if server.process is None:
            server.start()
    return subprocess.CompletedProcess(process.args, process.returncode, output.read_text()), outage


def history(server, run_id: str, key: str) -> list[dict]:
    points = server.get("metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
    return sorted(points, key=lambda point: int(point["step"]))


def test_training_goes_on_while_the_tracking_server_is_down(demo_shards, tmp_path):
    work = demo_workspace(demo_shards, tmp_path / "work", **PARAMS)
    with running_mlflow_server(tmp_path / "server") as server:
        result, outage = pretrain_through_an_outage(work, server)
        console = result.stdout.splitlines()
        assert result.returncode == 0, result.stdout[-4000:]
        assert outage.began, "the run ended before its second epoch began"
        assert outage.ended - outage.began >= PAUSE_S * 1000

        # The console said once that tracking fell behind and once that it caught up, and training spoke between.
        behind = [i for i, line in enumerate(console) if line.startswith(f"tracking: MLflow server {server.url} "
                                                                         "unreachable since ")]
        back = [i for i, line in enumerate(console) if line.startswith(f"tracking: MLflow server {server.url} "
                                                                       "is back; the ")]
        assert len(behind) == 1 and len(back) == 1 and behind[0] < back[0], "\n".join(console)
        # refused, or closed when the kill came in the middle of a request
        assert re.search(r"\(connection (refused|closed|reset)\); \d+ metrics queued, training goes on$",
                         console[behind[0]]), console[behind[0]]
        assert any(" step " in line for line in console[behind[0] + 1:back[0]]), "\n".join(console)
        assert not [line for line in console if "kept in" in line]  # nothing had to wait in a file

        [run] = server.post("runs/search", {"experiment_ids": [experiment_id(server)]})["runs"]
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        # Every step's metrics are in the run, each stamped when it was logged: steps went on during the outage,
        # and no pause between two steps comes near its length.
        points = {key: history(server, run_id, f"train_step/{key}") for key in STEP_KEYS}
        for key, found in points.items():
            assert [int(point["step"]) for point in found] == list(range(1, EPOCHS * STEPS + 1)), key
        assert sum(len(found) for found in points.values()) == EPOCHS * STEPS * len(STEP_KEYS)
        stamps = [int(point["timestamp"]) for point in points["loss"]]
        during = [stamp for stamp in stamps if outage.began < stamp < outage.ended]
        assert len(during) >= 3, (outage.began, outage.ended, stamps)
        longest = max(later - earlier for earlier, later in zip(stamps, stamps[1:], strict=False))
        assert longest < (outage.ended - outage.began) / 2, (longest, outage.ended - outage.began)
        epochs = history(server, run_id, "train/loss")
        assert [int(point["step"]) for point in epochs] == list(range(EPOCHS))
    assert not list((work / "logs").glob("*.mlflow-*.jsonl"))

    # The same run tracked into a local store, no server to lose: the same weights, bit for bit.
    reference = demo_workspace(demo_shards, tmp_path / "reference", **PARAMS)
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "--params", str(reference / "params.yaml"),
                           "pretrain"], cwd=PROJECT, env=environment(reference, f"sqlite:///{reference}/mlflow.db"),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = [torch.load(root / "runs/pretrain/checkpoint.pt", weights_only=False)["model"]
               for root in (work, reference)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def experiment_id(server) -> str:
    return server.get("experiments/get-by-name", experiment_name=PARAMS["experiment"])["experiment"]["experiment_id"]


def test_a_stage_without_its_tracking_server_fails_at_once(demo_shards, tmp_path):
    work = demo_workspace(demo_shards, tmp_path / "work", **PARAMS)
    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "--params", str(work / "params.yaml"), "pretrain"],
                            cwd=PROJECT, env=environment(work, url), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"hicmae: error: MLflow tracking server {url} cannot be reached (connection refused): start it, or unset "
        "MLFLOW_TRACKING_URI to track into mlflow.db"), result.stderr
    [ended] = [line for line in result.stdout.splitlines() if line.startswith("pretrain: failed in ")]
    minutes, seconds = re.match(r"pretrain: failed in (\d+):(\d\d) ", ended).groups()
    # The stage's own time, its imports included, on a busy machine; MLflow's own retries would take ~4 minutes.
    assert int(minutes) * 60 + int(seconds) <= 20, ended
    assert not (work / "runs").exists() and not (work / "ray_results").exists() and not (work / "mlflow.db").exists()
