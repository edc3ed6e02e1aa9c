"""Training on a real Ray cluster: pre-training runs as a Ray job submitted with ``scripts/ray_submit.sh``, and a
job whose Ray Train worker is killed resumes from its last checkpoint.

The module starts one Ray head node (dashboard on loopback) with its own temp dir, ports and authentication
token, by ``ray start --block`` so that every process of the cluster descends from it; teardown ends exactly those
processes (``ray stop`` would stop every Ray instance on the machine, other people's included).
"""

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from demo_data import demo_workspace

from pipeline.config.params import PROJECT_ROOT

pytestmark = pytest.mark.system

EXPERIMENT, KILLED_EXPERIMENT = "ray-cluster", "ray-cluster-killed"
PRETRAIN_EPOCHS = 4
STARTUP_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300
BIN = str(Path(sys.executable).parent)  # ray and hicmae: on the nodes' PATH, as in the project's image


@dataclass
class Cluster:
    head: subprocess.Popen  # `ray start --head --block`
    dashboard_url: str  # what `ray job submit` talks to
    env: dict  # environment of the cluster and its clients (PATH, the authentication token)

    def processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.head.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def get(self, path: str, **query) -> dict | list:
        """GET a dashboard endpoint (e.g. "api/jobs/") with the cluster's token; the decoded JSON."""
        url = f"{self.dashboard_url}/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on loopback."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(closing(socket.socket())) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def wait_for_dashboard(cluster: Cluster, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if cluster.head.poll() is not None:
            raise RuntimeError(f"ray start exited with {cluster.head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            cluster.get("api/version")
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the Ray dashboard at {cluster.dashboard_url} did not answer within {STARTUP_TIMEOUT_S} s")


def end_with_this_process() -> None:
    """In a child, before exec: get SIGTERM when the test process dies (Linux's parent-death signal)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def stop(head: subprocess.Popen) -> None:
    """SIGTERM the head (it ends its processes), then SIGKILL whatever is left of its process tree."""
    try:
        tree = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    head.terminate()
    _, alive = psutil.wait_procs(tree, timeout=20)
    for process in alive:
        with suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
    head.wait(timeout=10)


@contextmanager
def ray_head(temp_dir: Path, node_env: dict):
    """A Ray head node with 2 CPUs, ``node_env`` in its environment and its sessions under ``temp_dir``; its
    dashboard on loopback and a token required. Stopped on exit."""
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics = free_ports(7)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update({"PATH": BIN + os.pathsep + env["PATH"], "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once on SIGTERM
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), **node_env})
    # (`ray start` would replace --node-ip-address 127.0.0.1 by this host's address: Ray nodes must be reachable.)
    command = [f"{BIN}/ray", "start", "--head", "--block", "--port", str(gcs),
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
               "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
               "--metrics-export-port", str(metrics), "--num-cpus", "2", "--object-store-memory", str(300 * 2**20),
               "--temp-dir", str(temp_dir / "ray"), "--disable-usage-stats"]
    log = temp_dir / "ray-start.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=end_with_this_process)
    try:
        cluster = Cluster(head, f"http://127.0.0.1:{dashboard}", env)
        wait_for_dashboard(cluster, log)
        yield cluster
    finally:
        stop(head)


@pytest.fixture(scope="module")
def cluster(workdir, mlflow_server):
    """The module's cluster; like the nodes of docker/compose.yaml, its environment names the shared work
    folder and the MLflow server."""
    # A short path: Ray's Unix sockets live under the temp dir and their paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="hicmae-ray-", dir="/tmp"))
    try:
        with ray_head(temp_dir, {"HICMAE_WORKDIR": str(workdir), "MLFLOW_TRACKING_URI": mlflow_server.url}) as head:
            yield head
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, demo_shards):
    """The module's work folder on the shared demo's shards, with its params.yaml."""
    return demo_workspace(demo_shards, tmp_path_factory.mktemp("work"), experiment=EXPERIMENT, pretrain={
        "dataset": "demo", "model": {"size": "hicmae_test"}, "epochs": PRETRAIN_EPOCHS, "batch_size": 4,
        "optim": {"warmup_epochs": 1}}, scaling={
        "num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 1,  # DDP: one of the 2 gets killed
        "checkpoint_every": 1})


def submit(cluster: Cluster, *args: str) -> str:
    """``scripts/ray_submit.sh ARGS`` to the cluster, as a researcher would; the job's log."""
    client_env = {key: value for key, value in cluster.env.items()
                  if key not in ("HICMAE_WORKDIR", "MLFLOW_TRACKING_URI")}  # the job gets the nodes' values
    command = ["bash", str(PROJECT_ROOT / "scripts/ray_submit.sh"), *args]
    with subprocess.Popen(command, env={**client_env, "RAY_ADDRESS": cluster.dashboard_url}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True) as process:
        try:
            log, _ = process.communicate(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    assert process.returncode == 0, f"the job {' '.join(args)} failed:\n{log[-6000:]}"
    return log


@pytest.fixture(scope="module")
def pretrain_job(cluster, workdir):
    """The pre-training stage as a job, uninterrupted (also the reference for the resumed run's weights)."""
    return submit(cluster, "--params", str(workdir / "params.yaml"), "pretrain")


def test_killed_worker_resumes_from_its_last_checkpoint(cluster, workdir, pretrain_job, mlflow_server,
                                                        kill_worker_after_checkpoint, tmp_path):
    """A 2-worker pre-training job, one of whose Ray Train workers is SIGKILLed after the first checkpoint, still
    finishes, resumed from its last checkpoint, with the weights of the uninterrupted 2-worker run."""
    (tmp_path / "data").symlink_to(workdir / "data")  # the shards; this run's outputs go under tmp_path
    with kill_worker_after_checkpoint(cluster.processes, tmp_path / "ray_results") as killer:
        log = submit(cluster, "--params", str(workdir / "params.yaml"), "--env", f"HICMAE_WORKDIR={tmp_path}",
                     "--set", f"experiment={KILLED_EXPERIMENT}", "pretrain")

    assert killer.killed is not None, "no Ray Train worker was running after the first checkpoint"
    run = mlflow_server.runs_by_name(KILLED_EXPERIMENT)["pretrain-demo"]
    assert run["info"]["status"] == "FINISHED"
    resumed = mlflow_server.metric_history(run, "resumed_from_epoch")
    assert len(resumed) == 1  # one restart, announced in the same run by the replacement worker
    epoch = int(resumed[0]["value"])
    assert 0 <= epoch <= PRETRAIN_EPOCHS - 2
    assert f"resumes from its checkpoint after epoch {epoch + 1}" in log  # 1-based, as the epoch lines
    steps = [m["step"] for m in mlflow_server.metric_history(run, "train/loss")]
    assert sorted(set(steps)) == list(range(PRETRAIN_EPOCHS))
    assert steps.count(0) == 1  # epoch 0 was checkpointed before the kill and never trained again
    resumed_state = torch.load(tmp_path / "runs/pretrain/checkpoint.pt", weights_only=False)
    assert resumed_state["epoch"] == PRETRAIN_EPOCHS - 1

    # Restore is exact (model, optimizer, schedule, random draws): the same weights as the uninterrupted job.
    reference = torch.load(workdir / "runs/pretrain/checkpoint.pt", weights_only=False)["model"]
    assert reference.keys() == resumed_state["model"].keys()
    different = [name for name, value in reference.items() if not torch.equal(value, resumed_state["model"][name])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:5]}"


def test_pretraining_runs_as_a_job_on_an_existing_cluster(cluster, workdir, pretrain_job,
                                                           mlflow_server):
    """``scripts/ray_submit.sh pretrain``: the job succeeds on the cluster and leaves its outputs in the nodes'
    HICMAE_WORKDIR and its run in their MLflow server. (``finetune --dataset X`` goes the same way.)"""
    [job] = [job for job in cluster.get("api/jobs/") if "HICMAE_WORKDIR=" not in job["entrypoint"]]
    assert job["entrypoint"].endswith("hicmae --params params.yaml pretrain")
    assert job["status"] == "SUCCEEDED"
    # The training ran on this cluster, in the job's own Ray job: inside a job, start_ray joined the cluster
    # through the RAY_ADDRESS that Ray gives the job's driver.
    actors = cluster.get("api/v0/actors", filter_keys="class_name", filter_predicates="=",
                         filter_values="RayTrainWorker", limit=1000)["data"]["result"]["result"]
    assert job["job_id"] in {actor["job_id"] for actor in actors}

    assert torch.load(workdir / "runs/pretrain/checkpoint.pt", weights_only=False)["epoch"] == PRETRAIN_EPOCHS - 1
    assert json.loads((workdir / "runs/pretrain/metrics.json").read_text())["epoch"] == PRETRAIN_EPOCHS - 1
    assert not (workdir / "ray_results" / "pretrain-demo").exists()  # the outputs written, its run is forgotten
    run = mlflow_server.runs_by_name(EXPERIMENT)["pretrain-demo"]
    assert run["info"]["status"] == "FINISHED"
    assert [m["step"] for m in mlflow_server.metric_history(run, "train/loss")] == list(range(PRETRAIN_EPOCHS))
