"""A real ``mlflow server`` on loopback for tests, with plain-HTTP access to its REST API.

Tests get one server for the whole run through the session-scoped ``mlflow_server`` fixture of conftest.py::

    def test_logging(mlflow_server, monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        ...
        runs = mlflow_server.post("runs/search", {"experiment_ids": ["1"]})["runs"]

Outside pytest: ``with running_mlflow_server(folder) as server: ...``. The server keeps its SQLite store,
artifacts and log under that folder and is stopped (its whole process group) on exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class MlflowServer:
    """A running server: its base ``url`` and the ``folder`` holding mlflow.db, artifacts/ and server.log."""

    url: str
    folder: Path

    def api(self, endpoint: str) -> str:
        """The URL of a tracking REST endpoint, e.g. ``api("runs/search")``."""
        return f"{self.url}/api/2.0/mlflow/{endpoint}"

    def get(self, endpoint: str, **query) -> dict:
        """GET a tracking REST endpoint with query parameters; the decoded JSON answer."""
        return _request(f"{self.api(endpoint)}?{urllib.parse.urlencode(query)}")

    def post(self, endpoint: str, body: dict) -> dict:
        """POST a JSON body to a tracking REST endpoint; the decoded JSON answer."""
        return _request(self.api(endpoint), json.dumps(body).encode())

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log, for failure messages."""
        log = self.folder / "server.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def _request(url: str, data: bytes | None = None, timeout: float = 30) -> dict:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as answer:
        return json.loads(answer.read() or b"{}")


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_until_healthy(server: MlflowServer, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _healthy(server.url):
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"mlflow server not healthy after {timeout:.0f} s:\n{server.log_tail()}")
        time.sleep(0.2)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn and its workers), SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


@contextmanager
def running_mlflow_server(folder: str | Path, timeout: float = STARTUP_TIMEOUT_S) -> Iterator[MlflowServer]:
    """Start ``python -m mlflow server`` on a free loopback port, store and artifacts in ``folder``; yield it."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(url=f"http://{HOST}:{free_port()}", folder=folder)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", HOST, "--port", server.url.rsplit(":", 1)[1], "--workers", "1",
    ]
    # No telemetry, no background job runner (an extra process that tests do not use).
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(folder / "server.log", "wb") as log:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        _wait_until_healthy(server, process, timeout)
        yield server
    finally:
        _stop(process)
