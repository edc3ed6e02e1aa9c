"""The end-to-end run of the tiny demo that several test modules read: every stage through the real command
(``python -m pipeline.cli``, a process of its own as a user's) on a real Ray (loopback) and a real ``mlflow server``,
with 2 Ray Train workers (DDP on gloo) and both folds at once, eager. ``conftest.demo_run`` runs it once a test run;
tests/test_pipeline.py checks what it printed, wrote and logged, and tests/test_compile_stages.py compares compiled
stages with it. While the stages that start Ray run, the listening sockets of their process trees are recorded.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from demo_data import demo_params
from mlflow_server import running_mlflow_server

PROJECT = Path(__file__).resolve().parents[1]
EPOCHS, FOLDS = 2, (1, 2)
TIMEOUT_S = 900  # a stage's process, at most
STAGES = (["manifest", "--dataset", "demo"], ["preprocess", "--dataset", "demo"], ["pretrain"],
          ["finetune", "--dataset", "demo"], ["report"])


@dataclass
class DemoRun:
    work: Path  # HICMAE_WORKDIR of the run: raw/ (the shared demo's clips), data/, runs/, reports/, logs/
    console: list[str]  # what the five stages printed, stdout and stderr
    sockets: set[tuple[str, int, str]]  # (address, port, process) listened on while preprocess and pretrain ran
    mlflow: Path  # the folder of the MLflow store the run logged to (mlflow.db, artifacts/; its server stopped)

    def save(self, path: Path) -> None:
        """As JSON, for the other test processes (``load``)."""
        path.write_text(json.dumps({"work": str(self.work), "console": self.console, "mlflow": str(self.mlflow),
                                    "sockets": sorted(self.sockets)}))

    @classmethod
    def load(cls, path: Path) -> DemoRun:
        saved = json.loads(path.read_text())
        return cls(Path(saved["work"]), saved["console"], {tuple(socket) for socket in saved["sockets"]},
                   Path(saved["mlflow"]))


# The run's own sections of params.yaml over the shared demo (demo_data.demo_params): the test model size, 2 epochs,
# 2 DDP workers, a progress line at every step but an epoch's last.
PARAMS = {
    "experiment": "e2e",
    "pretrain": {"dataset": "demo", "model": {"size": "hicmae_test"}, "epochs": EPOCHS, "batch_size": 2,
                 "optim": {"warmup_epochs": 0}},
    "finetune": {"model": {"size": "hicmae_test"}, "epochs": EPOCHS, "batch_size": 2, "folds": list(FOLDS),
                 "optim": {"warmup_epochs": 0, "layer_decay": 0.75}},
    "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "preprocess_workers": 2},  # DDP on gloo, as a cluster
    "progress": {"show_every_s": 0.01},
}


def run_demo_pipeline(work: Path, mlflow: Path) -> DemoRun:
    """The five stages in ``work`` (which holds ``raw``), logging to a server of their own with its store in
    ``mlflow``; fails on the first stage that does not exit 0."""
    demo_params(work / "params.yaml", work, **PARAMS)
    console, sockets = [], set()
    with running_mlflow_server(mlflow) as server:
        for argv in STAGES:
            watch = argv[0] in ("preprocess", "pretrain")  # Ray Data; Ray Train, 2 workers on gloo
            result = hicmae(work, server, *argv, sockets=sockets if watch else None)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            console += (result.stdout + result.stderr).splitlines()
    return DemoRun(work, console, sockets, server.folder)


def hicmae(work: Path, server, *args: str, sockets: set | None = None) -> subprocess.CompletedProcess:
    """Run the command to its end; with ``sockets``, add the listening sockets of its process tree, polled."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(HICMAE_WORKDIR=str(work), MLFLOW_TRACKING_URI=server.url)
    # Output to files, not pipes: a pipe nobody reads while the sockets are polled would stop a talkative stage.
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--params", str(work / "params.yaml"),
                                    *args], cwd=PROJECT, env=env, stdout=stdout, stderr=stderr, text=True)
        watched, deadline = psutil.Process(process.pid), time.monotonic() + TIMEOUT_S
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                raise subprocess.TimeoutExpired(process.args, TIMEOUT_S)
            if sockets is not None:
                sockets |= listening(watched)
            time.sleep(0.5)
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout.read(), stderr.read())


def listening(process: psutil.Process) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of ``process`` and its descendants."""
    found = set()
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return found
    for member in members:
        try:
            for connection in member.net_connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN:
                    found.add((connection.laddr.ip, connection.laddr.port, member.name()))
        except psutil.Error:
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)
