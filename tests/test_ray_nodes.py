"""The stages on a Ray cluster of several nodes, one of which is lost mid-run: pre-training spreads its 2 Ray Train
workers over two nodes and, when one of them goes, resumes from its last checkpoint on the nodes left with the
weights of an uninterrupted run; preprocessing and batch prediction (Ray Data) finish with every clip exactly once.

The module's cluster is made as Ray's own tests make theirs (``ray.cluster_utils.Cluster``): a head node without
CPUs (the stages' processes attach to it, and Ray Train keeps a run's controller there) and three worker nodes of
one CPU each, every one of them on 127.0.0.1 with its own ports, in a temp dir of the module, with a token required. It
lives in a process of its own (this file run as a script, ``serve_cluster``), so that the token, the address Ray
records for ``ray.init()`` and the nodes' environment stay out of the test process (other tests start local Rays
in it), and its nodes go with it. The tests ask that process to remove a node (``Cluster.remove_node``: every
process of the node killed at once, as when a machine goes) and to add nodes back before the next test, as an
autoscaler replaces a lost machine.

The stages run as a user runs them against a cluster: the real command, ``python -m pipeline.cli``, with
``RAY_ADDRESS`` naming the cluster (here from the same machine, on loopback: ``NodeCluster.client_env``).
"""

from __future__ import annotations

import csv
import ctypes
import filecmp
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack, closing, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from demo_data import DEMO_PREPROCESS, demo_params, demo_workspace

LOOPBACK = "127.0.0.1"
WORKER_NODES, CPUS_PER_NODE = 3, 1  # 2 training workers, one a node, still fit once a node is gone
STARTUP_TIMEOUT_S = 120
STAGE_TIMEOUT_S = 300
PRETRAIN_EPOCHS = 4
EXPERIMENT, KILLED_EXPERIMENT = "ray-nodes", "ray-nodes-killed"
REGISTERED = "checkpoint_manager_snapshot.json"  # in a Ray Train run's folder once it registered a checkpoint
REPLY = "cluster: "  # what starts a line of the cluster process's answers on its stdout
PROJECT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.system


# ---------------------------------------------------------------------------------------------- the cluster process

def serve_cluster(config: dict) -> None:
    """The cluster (a head and ``config["workers"]`` worker nodes, all on loopback) until stdin closes; answers each
    command line of stdin (JSON: ``{"remove": NODE_ID}``, ``{"add": COUNT}``) with its worker nodes on stdout."""
    from ray.cluster_utils import Cluster

    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # stdout is for the replies alone: the rest to the log
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the test process died: shut the cluster down
    node = {"node_ip_address": LOOPBACK, "temp_dir": config["temp_dir"], "object_store_memory": 150 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "num_cpus": 0, "include_dashboard": True, "dashboard_host": LOOPBACK,
        "dashboard_port": config["dashboard_port"]})
    workers = {}

    def add(count: int) -> None:
        for _ in range(count):
            added = cluster.add_node(**node, num_cpus=config["cpus"])
            workers[added.node_id] = added
        cluster.wait_for_nodes()

    def answer(**reply) -> None:
        raylets = {node_id: worker.all_processes["raylet"][0].process.pid for node_id, worker in workers.items()}
        print(REPLY + json.dumps({**reply, "nodes": raylets}), file=replies, flush=True)

    try:
        add(config["workers"])
        answer(address=cluster.address)
        for line in sys.stdin:
            command = json.loads(line)
            if "remove" in command:
                cluster.remove_node(workers.pop(command["remove"]), allow_graceful=False)
            add(command.get("add", 0))
            answer()
    finally:
        cluster.shutdown()


def end_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the test process dies (Linux's parent-death signal)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(closing(socket.socket())) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass
class NodeCluster:
    """The test's side of the cluster process: its address, the environment of its clients, its worker nodes
    (node id -> raylet pid) and the commands that remove and add nodes."""

    process: subprocess.Popen
    log: Path
    client_env: dict
    address: str = ""
    nodes: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read_reply(self, timeout: float = STARTUP_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        reply: list[dict] = []

        def read() -> None:
            for line in self.process.stdout:
                if line.startswith(REPLY):
                    reply.append(json.loads(line[len(REPLY):]))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if not reply:
            raise RuntimeError(f"the cluster did not answer within {timeout} s:\n{self.log.read_text()[-4000:]}")
        self.nodes = reply[0]["nodes"]
        return reply[0]

    def command(self, **command) -> None:
        with self.lock:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
            self.read_reply()

    def remove(self, node_id: str) -> None:
        self.command(remove=node_id)

    def top_up(self, count: int) -> None:
        """Add worker nodes until there are ``count``."""
        if len(self.nodes) < count:
            self.command(add=count - len(self.nodes))

    def find(self, title: str) -> dict[int, tuple[str, str]]:
        """pid -> (worker node id, title) of each Ray worker process whose title (its command line) contains
        ``title``. (Ray titles a worker with what it runs: ``ray::IDLE``, a task's name, an actor's class, then
        ``.method`` while the actor runs one.)"""
        found = {}
        for node_id, raylet in list(self.nodes.items()):
            try:
                children = psutil.Process(raylet).children()  # a node's workers are its raylet's children
            except psutil.NoSuchProcess:
                continue
            for child in children:
                with suppress(psutil.Error, IndexError):
                    if title in child.cmdline()[0]:
                        found[child.pid] = node_id, child.cmdline()[0]
        return found

    def stop(self) -> None:
        """Close the process's stdin (it shuts the cluster down), then kill whatever is left of its tree."""
        try:
            tree = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        with suppress(OSError):
            self.process.stdin.close()
        _, alive = psutil.wait_procs(tree, timeout=30)
        for process in alive:
            with suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(alive, timeout=10)
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(mlflow_server):
    """The module's cluster (see the module docstring); its nodes' environment names the MLflow server, as the
    nodes of docker/compose.yaml do."""
    # A short path: Ray's Unix sockets live under the temp dir and their paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="hicmae-nodes-", dir="/tmp"))
    token = secrets.token_hex(32)
    base = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
            # Nodes and clients keep to 127.0.0.1 (Ray would replace it by this host's network address; see
            # preprocessing/ray_runtime.py), and so do the training runs' gloo sockets.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo",
            "MLFLOW_TRACKING_URI": mlflow_server.url}
    node_env = {**base, **auth,
                "RAY_TMPDIR": str(temp_dir),  # where Ray records the cluster's address for ray.init()
                # Ray Train's controller polls its workers every 0.5 s, not 2 (it hears of a run's end sooner), and
                # has no cloud nodes to watch; the GCS takes a node that stops answering for dead within ~3 s.
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    config = {"temp_dir": str(temp_dir / "ray"), "dashboard_port": free_ports(1)[0], "workers": WORKER_NODES,
              "cpus": CPUS_PER_NODE}
    log = temp_dir / "cluster.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, __file__, json.dumps(config)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=out, text=True, env=node_env, cwd=PROJECT,
                                   start_new_session=True, preexec_fn=end_with_parent)
    nodes = NodeCluster(process, log, {**base, **auth})
    try:
        nodes.address = nodes.read_reply()["address"]
        nodes.client_env["RAY_ADDRESS"] = nodes.address
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def full_cluster(cluster) -> NodeCluster:
    """The cluster with all its worker nodes (those an earlier test removed, replaced)."""
    cluster.top_up(WORKER_NODES)
    assert len(cluster.nodes) == WORKER_NODES
    return cluster


class NodeLoss(threading.Thread):
    """Notes, every 0.1 s, the worker node of each Ray worker process whose title contains ``title``; the first
    time one whose title also contains ``busy`` runs while ``ready()`` is true (given a ``ready``), removes its node
    from the cluster."""

    def __init__(self, cluster: NodeCluster, title: str, ready: Callable[[], bool] | None = None, busy: str = ""):
        super().__init__(daemon=True)
        self.cluster, self.title, self.ready, self.busy = cluster, title, ready, busy
        self.seen: dict[int, str] = {}  # pid -> node of every such process seen
        self.before: dict[int, str] = {}  # the same, as it was when the node was removed
        self.removed: str | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while not self.done.wait(0.1):
                found = self.cluster.find(self.title)
                self.seen.update({pid: node for pid, (node, _) in found.items()})
                running = [node for node, title in found.values() if self.busy in title]
                if self.ready is not None and self.removed is None and running and self.ready():
                    self.before = dict(self.seen)
                    self.removed = running[0]
                    self.cluster.remove(self.removed)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err

    def after(self) -> dict[int, str]:
        """pid -> node of the processes first seen after the node was removed."""
        return {pid: node for pid, node in self.seen.items() if pid not in self.before}

    def __enter__(self) -> NodeLoss:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()
        if self.error is not None:
            raise self.error


def run_stage(cluster: NodeCluster, work: Path, *args: str) -> str:
    """``python -m pipeline.cli ARGS`` with ``RAY_ADDRESS`` naming the cluster and ``HICMAE_WORKDIR`` ``work``;
    its output (the command must succeed)."""
    log = work / f"{args[2] if args[0] == '--params' else args[0]}.log"
    env = {**cluster.client_env, "HICMAE_WORKDIR": str(work)}
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=PROJECT, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=STAGE_TIMEOUT_S)
    output = log.read_text()
    assert done.returncode == 0, f"hicmae {' '.join(args)} failed:\n{output[-6000:]}"
    return output


# ------------------------------------------------------------------------------------------------------ pre-training

def pretrain_workspace(demo: Path, work: Path, experiment: str) -> Path:
    return demo_workspace(demo, work, experiment=experiment, pretrain={
        "dataset": "demo", "model": {"size": "hicmae_test"}, "epochs": PRETRAIN_EPOCHS, "batch_size": 4,
        "optim": {"warmup_epochs": 1}}, scaling={
        "num_workers": 2, "cpus_per_worker": CPUS_PER_NODE, "placement_strategy": "STRICT_SPREAD",
        "loader_workers": 0, "max_failures": 1, "checkpoint_every": 1})


def final_state(work: Path) -> dict:
    import torch  # here: the cluster process runs this file and needs no torch

    return torch.load(work / "runs/pretrain/checkpoint.pt", weights_only=False)


def unequal_tensors(first: dict, second: dict) -> list[str]:
    """The names of the tensors of ``first`` that are not exactly those of ``second``."""
    import torch

    return [name for name, value in first.items() if not torch.equal(value, second[name])]


@pytest.fixture(scope="module")
def pretrain_run(cluster, demo_shards, tmp_path_factory) -> tuple[Path, NodeLoss]:
    """Pre-training on the cluster, uninterrupted (also the reference for the resumed run's weights): its work
    folder and where its Ray Train workers ran."""
    cluster.top_up(WORKER_NODES)
    work = pretrain_workspace(demo_shards, tmp_path_factory.mktemp("pretrain"), EXPERIMENT)
    with NodeLoss(cluster, "ray::RayTrainWorker") as watch:
        run_stage(cluster, work, "--params", str(work / "params.yaml"), "pretrain")
    return work, watch


def test_pretraining_spreads_its_workers_over_two_nodes(pretrain_run, mlflow_server):
    """``scaling.placement_strategy: STRICT_SPREAD``: the 2 Ray Train workers run on two worker nodes, one each, and
    train all the epochs."""
    work, watch = pretrain_run
    assert len(watch.seen) == 2, f"Ray Train workers seen: {watch.seen}"  # the 2 workers, never replaced
    assert len(set(watch.seen.values())) == 2, f"both workers ran on one node: {watch.seen}"
    assert final_state(work)["epoch"] == PRETRAIN_EPOCHS - 1
    run = mlflow_server.runs_by_name(EXPERIMENT)["pretrain-demo"]
    assert run["info"]["status"] == "FINISHED"
    assert [m["step"] for m in mlflow_server.metric_history(run, "train/loss")] == list(range(PRETRAIN_EPOCHS))


def test_pretraining_that_loses_a_node_resumes_on_the_nodes_left(full_cluster, pretrain_run, demo_shards,
                                                                  mlflow_server, tmp_path):
    """A node that holds one of the 2 workers is removed after the first checkpoint: the run goes on from its last
    checkpoint with 2 new workers on two of the nodes left, and ends with the uninterrupted run's weights."""
    work = pretrain_workspace(demo_shards, tmp_path / "work", KILLED_EXPERIMENT)
    registered = lambda: any((work / "ray_results").rglob(REGISTERED))
    with NodeLoss(full_cluster, "ray::RayTrainWorker", ready=registered) as loss:
        run_stage(full_cluster, work, "--params", str(work / "params.yaml"), "pretrain")

    assert loss.removed is not None, "no Ray Train worker was running after the first checkpoint"
    assert len(set(loss.before.values())) == 2 and loss.removed in loss.before.values()
    after = loss.after()
    assert len(after) == 2, f"the workers that took over: {after}"
    assert loss.removed not in after.values() and len(set(after.values())) == 2  # still one a node
    assert loss.removed not in full_cluster.nodes

    run = mlflow_server.runs_by_name(KILLED_EXPERIMENT)["pretrain-demo"]
    assert run["info"]["status"] == "FINISHED"
    [resumed] = mlflow_server.metric_history(run, "resumed_from_epoch")  # one restart, in the same run
    epoch = int(resumed["value"])
    assert 0 <= epoch <= PRETRAIN_EPOCHS - 2
    steps = [m["step"] for m in mlflow_server.metric_history(run, "train/loss")]
    assert sorted(set(steps)) == list(range(PRETRAIN_EPOCHS))
    assert steps.count(0) == 1  # epoch 0 was checkpointed before the loss and never trained again

    # Restore is exact (model, optimizer, schedule, random draws): the same weights as the uninterrupted run.
    resumed_state, reference = final_state(work), final_state(pretrain_run[0])
    assert resumed_state["epoch"] == PRETRAIN_EPOCHS - 1
    assert reference["model"].keys() == resumed_state["model"].keys()
    different = unequal_tensors(reference["model"], resumed_state["model"])
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:5]}"


# ----------------------------------------------------------------------------------------------------- preprocessing

def shard_clip_ids(shards: Path) -> Counter:
    """How many times each clip id is in the shards (read from every sample's meta.json)."""
    ids = Counter()
    for shard in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".meta.json"):
                    ids[json.loads(tar.extractfile(member).read())["clip_id"]] += 1
    return ids


def test_preprocessing_that_loses_a_node_writes_every_clip_once(full_cluster, demo_shards, tmp_path):
    """``hicmae preprocess`` on Ray Data, a node running one of its tasks removed before the work is done: every
    clip is in the shards and the status table once, and the output is byte for byte the shared demo's (made
    without Ray), with no temporary file left behind."""
    demo, work = demo_shards / "data/demo", tmp_path
    (work / "data/demo").mkdir(parents=True)
    for name in ("manifest.jsonl", "manifest.info.json"):  # the manifest stage's output, as DVC would restore it
        shutil.copy(demo / name, work / "data/demo" / name)
    params = demo_params(work / "params.yaml", demo_shards, experiment=EXPERIMENT,
                         scaling={"preprocess_workers": 2, "preprocess_cpus": CPUS_PER_NODE})
    processed, expected = work / "data/demo/processed", demo / "processed"
    units = len(list((expected / "units").glob("unit-*.json")))
    done_at_loss = []

    def unfinished() -> bool:  # a unit is done when its status file is there
        done_at_loss[:] = [len(list((processed / "units").glob("unit-*.json")))]
        return done_at_loss[0] < units

    with NodeLoss(full_cluster, "process_unit_rows", ready=unfinished) as loss:
        run_stage(full_cluster, work, "--params", str(params), "preprocess", "--dataset", "demo")

    assert loss.removed is not None, "no preprocessing task was running before the work was done"
    assert done_at_loss[0] < units
    manifest_ids = [json.loads(line)["clip_id"] for line in (demo / "manifest.jsonl").read_text().splitlines()]
    status = [json.loads(line) for line in (processed / "status.jsonl").read_text().splitlines()]
    assert Counter(row["clip_id"] for row in status) == Counter(manifest_ids)  # each clip once
    assert {row["status"] for row in status} == {"ok"}
    assert shard_clip_ids(processed / "shards") == Counter(manifest_ids)
    assert shard_clip_ids(expected / "shards") == Counter(manifest_ids)
    for folder in ("shards", "units"):
        names = sorted(path.name for path in (processed / folder).iterdir())
        assert names == sorted(path.name for path in (expected / folder).iterdir()), folder  # no leftovers
        _, mismatch, errors = filecmp.cmpfiles(processed / folder, expected / folder, names, shallow=False)
        assert not mismatch and not errors, f"{folder}: {mismatch + errors} differ from the demo's"
    for name in ("status.jsonl", "summary.json"):
        assert filecmp.cmp(processed / name, expected / name, shallow=False), name


def test_a_task_lost_mid_write_leaves_no_temporary_file(demo_shards, tmp_path, monkeypatch):
    """A unit whose task was lost while it wrote its shard (a temporary file left beside it; Ray Data ran the
    unit again on another node) leaves nothing of that in the output: it holds what a run on one machine holds."""
    from preprocessing import run  # here: the cluster process runs this file and needs none of it
    from preprocessing.settings import PreprocessSettings

    process_unit = run.process_unit

    def lost_then_run_again(out_dir: Path, *args):
        leftover = out_dir / "shards" / f".shard-{args[2].index:06d}.tar.4242-0badcafe.tmp"
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_bytes(b"the first half of a shard")
        return process_unit(out_dir, *args)

    monkeypatch.setattr(run, "process_unit", lost_then_run_again)
    demo = demo_shards / "data/demo"
    summary = run.preprocess(demo / "manifest.jsonl", tmp_path, demo_shards / "raw",
                             PreprocessSettings(**DEMO_PREPROCESS, use_ray=False, progress=False))
    assert summary["ok"] == summary["clips"] > 0
    assert not [path.name for path in tmp_path.rglob(".*.tmp")]


# ---------------------------------------------------------------------------------------------------- batch prediction

CLASSES = ["neutral", "happy", "angry", "sad"]  # conftest.random_classifier's


@pytest.fixture(scope="module")
def model(random_classifier) -> Path:
    return random_classifier


def test_prediction_that_loses_a_node_has_one_row_per_video(full_cluster, demo_shards, model, tmp_path):
    """``hicmae predict`` on a folder of videos (Ray Data), the node of one of its CPU actors removed once the
    first rows are in: the table has every video once, each predicted."""
    videos = sorted((demo_shards / "raw/clips").glob("*.mp4"))
    table = tmp_path / "predictions.jsonl"
    rows_at_loss = []

    def unfinished() -> bool:
        rows_at_loss[:] = [len(table.read_text().splitlines()) if table.exists() else 0]
        return rows_at_loss[0] < len(videos)

    with NodeLoss(full_cluster, "(ClipWindows)", ready=unfinished, busy=".submit") as loss:  # one at work on clips
        run_stage(full_cluster, tmp_path, "predict", str(demo_shards / "raw/clips"), "--model", str(model),
               "--out", str(tmp_path / "predictions.csv"), "--workers", "2", "--device", "cpu")

    assert loss.removed is not None, "no CPU actor was at work on clips before the table was complete"
    assert rows_at_loss[0] < len(videos)
    # Ray Data replaced the lost actor on a node left (and ran its unfinished clips there).
    assert loss.after() and loss.removed not in loss.after().values()
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    assert Counter(row["path"] for row in rows) == Counter(str(video) for video in videos)  # each video once
    assert {row["status"] for row in rows} == {"ok"}
    assert all(sum(row["clip"]["probabilities"].values()) == pytest.approx(1, abs=1e-4) for row in rows)
    with (tmp_path / "predictions.csv").open(newline="") as handle:
        assert [line["path"] for line in csv.DictReader(handle)] == [row["path"] for row in rows]


if __name__ == "__main__":  # the cluster process (the ``cluster`` fixture)
    serve_cluster(json.loads(sys.argv[1]))
