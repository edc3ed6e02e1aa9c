"""A real ``mlflow server`` on loopback for tests, with plain-HTTP access to its REST API.

Tests get one server for the whole run through the session-scoped ``mlflow_server`` fixture of conftest.py::

    def test_logging(mlflow_server, monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        ...
        runs = mlflow_server.post("runs/search", {"experiment_ids": ["1"]})["runs"]

Outside pytest: ``with running_mlflow_server(folder) as server: ...``. The server keeps its SQLite store,
artifacts and log under that folder and is stopped (its whole process group) on exit. A test of an outage stops it
and starts it again, on the same port with the same store: ``server.stop(signal.SIGKILL)``, ``server.start()``.

Start-up is given minutes (``STARTUP_TIMEOUT_S``), not seconds: with three test processes on two cores it competes
with Ray clusters and training runs, and a server that is slow to start is not a failure of the test that needs it.
A new server whose process exits before it answers (its port, free when chosen, taken meanwhile by another test
process's server or Ray) is started again on another port.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 180.0
STARTS = 3  # a new server on a free port: tries, each on a port of its own (ServerExited)


class ServerExited(RuntimeError):
    """The server's process ended before it answered ``/health``."""


@dataclass
class MlflowServer:
    """A server: its base ``url`` and the ``folder`` holding mlflow.db, artifacts/ and server.log; ``process``: the
    ``mlflow server`` process (the leader of its own process group) while it runs."""

    url: str
    folder: Path
    process: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Start ``python -m mlflow server`` on the server's port with its store and artifacts; returns once it
        answers ``/health``. Its output is appended to server.log (a restart keeps the earlier output)."""
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
            "--host", HOST, "--port", str(self.port), "--workers", "1",
        ]
        # No telemetry, no background job runner (an extra process that tests do not use).
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(command, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            _wait_until_healthy(self, self.process, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the server's whole process group: SIGTERM (SIGKILL if it lingers), or ``sig`` (SIGKILL: a crash, as
        a node that dies). Its port is free again when this returns."""
        if self.process is not None:
            _stop(self.process, sig)
            self.process = None
            _wait_until_port_free(self.port)

    def api(self, endpoint: str) -> str:
        """The URL of a tracking REST endpoint, e.g. ``api("runs/search")``."""
        return f"{self.url}/api/2.0/mlflow/{endpoint}"

    def get(self, endpoint: str, **query) -> dict:
        """GET a tracking REST endpoint with query parameters; the decoded JSON answer."""
        return _request(f"{self.api(endpoint)}?{urllib.parse.urlencode(query)}")

    def post(self, endpoint: str, body: dict) -> dict:
        """POST a JSON body to a tracking REST endpoint; the decoded JSON answer."""
        return _request(self.api(endpoint), json.dumps(body).encode())

    def runs_by_name(self, experiment: str) -> dict[str, dict]:
        """The runs of ``experiment`` (up to 100) by run name, as the REST API gives them."""
        experiment_id = self.get("experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
        runs = self.post("runs/search", {"experiment_ids": [experiment_id], "max_results": 100})["runs"]
        return {run["info"]["run_name"]: run for run in runs}

    def metric_history(self, run: dict, key: str) -> list[dict]:
        """Every point of metric ``key`` of ``run`` (value, step, timestamp)."""
        return self.get("metrics/get-history", run_id=run["info"]["run_id"], metric_key=key).get("metrics", [])

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
            raise ServerExited(f"mlflow server exited with {process.returncode}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"mlflow server not healthy after {timeout:.0f} s:\n{server.log_tail()}")
        time.sleep(0.2)


def _stop(process: subprocess.Popen, sig: signal.Signals = signal.SIGTERM) -> None:
    """Send ``sig`` to the server's process group (uvicorn and its workers), SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def _wait_until_port_free(port: int, timeout: float = 15) -> None:
    """Until a listening socket could bind ``port`` again: the killed server's processes have all let it go."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            try:
                sock.bind((HOST, port))
                return
            except OSError:
                time.sleep(0.1)
    raise TimeoutError(f"port {port} still in use {timeout:.0f} s after the server was stopped")


@contextmanager
def running_mlflow_server(folder: str | Path, timeout: float = STARTUP_TIMEOUT_S) -> Iterator[MlflowServer]:
    """Start ``python -m mlflow server`` on a free loopback port, store and artifacts in ``folder``; yield it."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, STARTS + 1):
        server = MlflowServer(url=f"http://{HOST}:{free_port()}", folder=folder)
        try:
            server.start(timeout)
            break
        except ServerExited:
            if attempt == STARTS:
                raise
    try:
        yield server
    finally:
        server.stop()
