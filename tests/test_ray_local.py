"""A local Ray that really is local: with no ``RAY_ADDRESS``, every socket the stages' Ray sessions listen on is on
the loopback interface (GCS, raylet, object manager, dashboard and its agents, each worker's gRPC server, Ray Data's
actors, Ray Train's workers and their gloo rendezvous)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from preprocessing.datasets.demo import generate_demo

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1]


def listening(process: psutil.Process) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of ``process`` and its descendants."""
    found = set()
    for member in [process, *process.children(recursive=True)]:
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


def run_watching(command: list[str], env: dict) -> set[tuple[str, int, str]]:
    """Run ``command``; the listening sockets of its process tree, polled while it runs."""
    process = subprocess.Popen(command, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    watched, seen = psutil.Process(process.pid), set()
    while process.poll() is None:
        seen |= listening(watched)
        time.sleep(1.0)
    output = process.stdout.read()
    assert process.returncode == 0, output[-4000:]
    return seen


def test_every_port_of_a_local_ray_listens_on_loopback_only(tmp_path):
    generate_demo(tmp_path / "raw", seed=0, speakers=5, clips_per_speaker=1)
    params = {"datasets": {"demo": {"root": str(tmp_path / "raw")}}, "preprocess": {"shard_size": 3},
              "pretrain": {"dataset": "demo", "model": {"size": "hicmae_test"}, "epochs": 1, "batch_size": 2,
                           "optim": {"warmup_epochs": 0}},
              "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "preprocess_workers": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(HICMAE_WORKDIR=str(tmp_path), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cli = [sys.executable, "-m", "pipeline.cli", "--params", str(tmp_path / "params.yaml")]
    subprocess.run([*cli, "manifest", "--dataset", "demo"], cwd=PROJECT, env=env, check=True, capture_output=True)

    sockets = run_watching([*cli, "preprocess", "--dataset", "demo"], env)   # Ray Data
    sockets |= run_watching([*cli, "pretrain"], env)                        # Ray Train, 2 workers on gloo
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names and len(sockets) >= 10, sockets  # the sessions were seen
    exposed = sorted(socket for socket in sockets if not is_loopback(socket[0]))
    assert not exposed, f"listening beyond loopback: {exposed}"
