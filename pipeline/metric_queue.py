"""Delivering a run's metrics to MLflow without making training wait: ``MetricQueue`` (what ``tracking.RunLogger``
logs through), the spill files of what a run's end could not deliver, and their later delivery.

Each delivery attempt is one request with a short timeout and none of MLflow's own retries, repeated with back-off
for as long as the run goes on; the console says once that tracking is behind, and once that it caught up.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import mlflow
from mlflow.entities import Metric
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request, verify_rest_response

from preprocessing.errors import InputError

from .console import console_log, current
from .layout import Layout, shown

LOCAL_SCHEMES = ("sqlite", "file", "")
# One delivery attempt of queued metrics: no retries of MLflow's own and a short timeout (its calls wait 120 s, 7 times
# over, with growing pauses), so that the queue notices within seconds that the server is back.
ATTEMPT_TIMEOUT_S = 5.0
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0  # the pause after a failed attempt, doubling up to the most
BATCH_LIMIT = 1000  # metrics in one log-batch request: MLflow's limit
SETTLE_S = ATTEMPT_TIMEOUT_S  # the most a checkpoint waits for the metrics before it (the server up)
FLUSH_ENV, FLUSH_DEFAULT_S = "HICMAE_TRACKING_FLUSH_S", 60.0  # the most a run's end waits for its queued metrics
MISSING_SPAN_TAG = "tracking.missing_span"  # a run's metrics that are not in MLflow: steps, times, where they are
# Error codes of a server that took the request and refused it (a deleted run, a bad value): retrying cannot help.
REFUSALS = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST")


def is_local_store(uri: str) -> bool:
    """True for a store on this machine (SQLite file or a local directory), false for a server."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    return scheme in LOCAL_SCHEMES


def failure_reason(err: BaseException) -> str:
    """Why a request to the server failed, in a few words ("connection refused", "timed out", ...)."""
    text = str(err)
    for needle, reason in (("refused", "connection refused"), ("timed out", "timed out"), ("timeout", "timed out"),
                           ("reset by peer", "connection reset"), ("aborted", "connection closed"),
                           ("closed connection", "connection closed"),
                           ("connection broken", "connection closed"),  # urllib3: the server went mid-response
                           ("not known", "unknown host"),
                           ("failure in name resolution", "unknown host")):
        if needle in text.lower():
            return reason
    cause = text.rsplit("Caused by ", 1)[-1]  # urllib3's reason, after the request's URL
    return (cause.strip().splitlines() or [type(err).__name__])[0][:160]


def is_refusal(err: BaseException) -> bool:
    """Whether the server took a request and refused it (``REFUSALS``): sending it again cannot help."""
    return getattr(err, "error_code", None) in REFUSALS


class Point(NamedTuple):
    """One value of a metric as MLflow keeps it: its key, value, when it was logged (ms since 1970) and step."""

    key: str
    value: float
    timestamp: int
    step: int


def _post(uri: str, endpoint: str, body: dict) -> None:
    """One POST to a tracking server's REST API (``endpoint``: e.g. "runs/log-batch") that fails within
    ``ATTEMPT_TIMEOUT_S`` and is not retried: the caller decides. MLflow's client settings (its retries, timeout) are
    left as they are for everything else."""
    path = f"/api/2.0/mlflow/{endpoint}"
    response = http_request(get_default_host_creds(uri), path, "POST", max_retries=0, backoff_factor=0,
                            timeout=ATTEMPT_TIMEOUT_S, json=body)
    verify_rest_response(response, path)


def send_metrics(uri: str, run_id: str, points: Sequence[Point]) -> None:
    """One attempt to add ``points`` (at most ``BATCH_LIMIT``) to run ``run_id``; raises if it failed. Sending the
    same points twice stores them once (MLflow drops exact duplicates), so a retry is safe."""
    if is_local_store(uri):
        mlflow.MlflowClient(uri).log_batch(run_id, metrics=[Metric(*point) for point in points])
    else:
        _post(uri, "runs/log-batch", {"run_id": run_id, "metrics": [point._asdict() for point in points]})


def send_tag(uri: str, run_id: str, key: str, value: str | None) -> None:
    """One attempt to set (or, ``value`` None, delete) tag ``key`` of run ``run_id``; raises if it failed."""
    if is_local_store(uri):
        client = mlflow.MlflowClient(uri)
        client.set_tag(run_id, key, value) if value is not None else client.delete_tag(run_id, key)
    elif value is not None:
        _post(uri, "runs/set-tag", {"run_id": run_id, "key": key, "value": value})
    else:
        _post(uri, "runs/delete-tag", {"run_id": run_id, "key": key})


def flush_timeout_s() -> float:
    """The most seconds a run's end waits for MLflow to take its queued metrics (``HICMAE_TRACKING_FLUSH_S``)."""
    value = os.environ.get(FLUSH_ENV, "")
    try:
        return float(value) if value else FLUSH_DEFAULT_S
    except ValueError:
        raise InputError(f"{FLUSH_ENV}={value!r}: not a number of seconds") from None


def spill_path(run_id: str) -> Path:
    """Where the metrics of run ``run_id`` that MLflow did not take in time go: beside the stage's log
    (``logs/<stage>.mlflow-<run id>.jsonl``), or ``logs/tracking.mlflow-<run id>.jsonl`` outside a stage."""
    log = console_log() or Layout.current().log_file("tracking")
    return log.with_name(f"{log.stem}.mlflow-{run_id}.jsonl")


def describe_span(points: Sequence[Point]) -> dict:
    """The first and last step and time (ISO, local) of ``points`` and how many they are."""
    steps = [point.step for point in points]
    times = [time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(point.timestamp / 1000)) for point in points]
    return {"first_step": min(steps), "last_step": max(steps), "first_time": min(times), "last_time": max(times),
            "metrics": len(points)}


def span_text(points: Sequence[Point]) -> str:
    """``steps 12-60, 12:03:04-12:07:40`` for a console line."""
    span = describe_span(points)
    first, last = (span[key].split("T")[1] for key in ("first_time", "last_time"))
    return f"steps {span['first_step']}-{span['last_step']}, {first}-{last}"


def write_spill(path: Path, uri: str, run_id: str, points: Sequence[Point]) -> None:
    """Append ``points`` to the JSON-lines file ``path``: a first line naming the server and the run, then one
    point a line (``Point``'s fields)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as file:
        if new:
            file.write(json.dumps({"tracking_uri": uri, "run_id": run_id}) + "\n")
        file.writelines(json.dumps(point._asdict()) + "\n" for point in points)


def read_spill(path: Path) -> tuple[dict, list[Point]]:
    """The header (server, run) and the points of a file ``write_spill`` wrote; a line cut short (its writer killed
    while writing) is left out. A ``ValueError`` when the file does not name its server and run."""
    header, *lines = path.read_text(encoding="utf-8").splitlines() or [""]
    points = []
    for line in lines:
        with contextlib.suppress(ValueError, TypeError):
            points.append(Point(**json.loads(line)))
    try:
        named = json.loads(header)
        return {"tracking_uri": named["tracking_uri"], "run_id": named["run_id"]}, points
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"{path}: not a file of undelivered metrics (no server and run on its first line)") from None


def deliver_spill(path: Path) -> bool:
    """Deliver the points of a ``write_spill`` file into their run and delete it (clearing the run's
    ``MISSING_SPAN_TAG``); True when done or when there is no such file. When the server does not take them, the
    file stays, the run gets the tag (where the server takes that) and a console line says what is missing."""
    if not path.is_file():
        return True
    try:
        header, points = read_spill(path)
    except (OSError, ValueError) as err:
        current().show(f"tracking: {shown(path)} left as it is: {err}")
        return False
    uri, run_id = header["tracking_uri"], header["run_id"]
    if not points:
        path.unlink()
        return True
    try:
        for start in range(0, len(points), BATCH_LIMIT):
            send_metrics(uri, run_id, points[start:start + BATCH_LIMIT])
    except Exception as err:  # noqa: BLE001 - the server is away or refuses: the file keeps them
        with contextlib.suppress(Exception):
            send_tag(uri, run_id, MISSING_SPAN_TAG, json.dumps({**describe_span(points), "file": str(path)}))
        current().show(f"tracking: {len(points)} metrics of run {run_id} ({span_text(points)}) are still not in "
                       f"MLflow ({failure_reason(err)}); kept in {shown(path)}")
        return False
    with contextlib.suppress(Exception):  # no tag: the usual case
        send_tag(uri, run_id, MISSING_SPAN_TAG, None)
    path.unlink()
    current().show(f"tracking: {len(points)} metrics of run {run_id} ({span_text(points)}) delivered to MLflow "
                   f"from {shown(path)}")
    return True


def deliver_leftovers(uri: str) -> None:
    """Deliver what earlier runs on the server ``uri`` left beside the stage logs (``deliver_spill``)."""
    log = console_log()
    if log is None:
        return
    for path in sorted(log.parent.glob("*.mlflow-*.jsonl")):
        if spill_server(path) == uri:
            deliver_spill(path)


def spill_server(path: Path) -> str | None:
    """The tracking server a ``write_spill`` file is for (its first line), None if it does not say."""
    with open(path, encoding="utf-8") as file, contextlib.suppress(ValueError, AttributeError):
        return json.loads(file.readline()).get("tracking_uri")
    return None


class MetricQueue:
    """One run's metrics on their way to MLflow, in the process that logs them. ``put`` only queues; a daemon thread
    delivers the points in order, in batches, one short attempt at a time (``send_metrics``), and after a failure
    tries again with back-off for as long as the process lives: training never waits on the server. The console hears
    once that tracking is behind and once that it caught up. ``flush`` waits, bounded, for the queue to empty and
    writes what is left to ``spill_file`` (``write_spill``)."""

    def __init__(self, uri: str, run_id: str, spill_file: Path, console=None):
        self.uri, self.run_id, self.spill_file, self.console = uri, run_id, spill_file, console
        self._points: deque[Point] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None  # the delivering thread; another one stops at its next turn
        self._hurry = False  # try now, not after the pause: a flush waits
        self._down_since: float | None = None  # wall time of the first failed attempt of an outage
        self._late = 0  # points delivered since the outage began

    def put(self, points: Sequence[Point]) -> None:
        """Queue ``points`` for delivery (starting the thread the first time); returns at once."""
        with self._lock:
            self._points.extend(points)
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver, name=f"mlflow-{self.run_id[:8]}", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def pending(self) -> int:
        """Points not delivered yet."""
        with self._lock:
            return len(self._points)

    def settle(self, timeout: float) -> bool:
        """While the server takes metrics, wait up to ``timeout`` seconds for the queue to empty (the moments
        before a checkpoint: what was logged up to it is in MLflow should this process die); during an outage,
        return at once. True if nothing is left."""
        with self._lock:
            if self._down_since is not None:
                return not self._points
            self._hurry = True
            self._lock.notify_all()
            settled = self._lock.wait_for(lambda: not self._points or self._down_since is not None, timeout)
            self._hurry = False
            return settled and not self._points

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every queued point to be delivered; True if they were. Else the points
        left are written to ``spill_file``, the thread stops, and a console line names the file."""
        with self._lock:
            self._hurry = True
            self._lock.notify_all()
            delivered = self._lock.wait_for(lambda: not self._points, timeout)
            self._hurry = False
            if delivered:
                return True
            left, self._points, self._thread, self._down_since = list(self._points), deque(), None, None
            self._lock.notify_all()
        write_spill(self.spill_file, self.uri, self.run_id, left)
        self._show(f"tracking: MLflow server {self.uri} did not take {len(left)} metrics of run {self.run_id} "
                   f"({span_text(left)}) within {timeout:g} s at the run's end; kept in {shown(self.spill_file)}, "
                   "delivered when the stage ends or a later stage reaches the server")
        return False

    def _deliver(self) -> None:
        """The thread: deliver the oldest points (at most ``BATCH_LIMIT``) until another thread takes over."""
        me, pause = threading.current_thread(), RETRY_FIRST_S
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._points or self._thread is not me)
                if self._thread is not me:
                    return
                batch = list(itertools.islice(self._points, BATCH_LIMIT))
            try:
                send_metrics(self.uri, self.run_id, batch)
            except Exception as err:  # noqa: BLE001 - whatever went wrong, the points stay queued or are kept
                if is_refusal(err):
                    self._refused(me, batch, err)
                    continue
                self._behind(err)
                with self._lock:
                    self._lock.wait_for(lambda: self._hurry or self._thread is not me, pause)
                    self._hurry = False
                pause = min(2 * pause, RETRY_MAX_S)
                continue
            pause = RETRY_FIRST_S
            self._delivered(me, len(batch))

    def _take(self, me: threading.Thread, count: int) -> bool:
        """Drop the ``count`` oldest points (just delivered or kept), unless another thread took over meanwhile."""
        with self._lock:
            if self._thread is not me:
                return False
            for _ in range(count):
                self._points.popleft()
            self._lock.notify_all()
            return True

    def _delivered(self, me: threading.Thread, count: int) -> None:
        if not self._take(me, count) or self._down_since is None:
            return
        self._late += count
        if self.pending() == 0:
            self._show(f"tracking: MLflow server {self.uri} is back; the {self._late} metrics queued since "
                       f"{clock_of(self._down_since)} are delivered")
            self._down_since = None

    def _behind(self, err: BaseException) -> None:
        if self._down_since is None:
            self._down_since, self._late = time.time(), 0
            self._show(f"tracking: MLflow server {self.uri} unreachable since {clock_of(self._down_since)} "
                       f"({failure_reason(err)}); {self.pending()} metrics queued, training goes on")

    def _refused(self, me: threading.Thread, batch: list[Point], err: BaseException) -> None:
        if self._take(me, len(batch)):
            write_spill(self.spill_file, self.uri, self.run_id, batch)
            self._show(f"tracking: MLflow refused {len(batch)} metrics of run {self.run_id} ({span_text(batch)}: "
                       f"{failure_reason(err)}); kept in {shown(self.spill_file)}")

    def _show(self, text: str) -> None:
        (self.console or current()).show(text)


def clock_of(seconds_since_1970: float) -> str:
    """``12:03:04``: a wall time, local, for a console line."""
    return time.strftime("%H:%M:%S", time.localtime(seconds_since_1970))
