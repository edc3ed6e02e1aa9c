"""What a stage prints, and where everything else goes.

A stage's console is short: a header (stage, dataset, model, workers, device), progress within long work, a line
per epoch (per fold when folds run side by side), and a summary at the end. Every line goes through the stage's
``Console``, from whichever process has it: the stage's own, a fold's driver task, rank 0 of a Ray Train run. In
the stage's process a line is printed and written to the stage's log file (``logs/<stage>[-<dataset>].log`` under
the work root, also logged to the stage's MLflow run); elsewhere it travels over a Ray queue to the stage's process,
which prints it: once, without Ray's process prefix, never folded with another process's lines. ``detail`` lines
go to the log file only.

Library output nobody can act on is silenced where it starts (``quiet_libraries``, through each library's own
settings): Ray forwards no worker output to the console (``log_to_driver``), Ray Train logs warnings only, Ray
Data errors only (its hints go to its own log file), MLflow warnings only (and no "View run" URL for every run:
the stage shows its own run's, once), Ray's token authentication is set on explicitly (so it does not announce
itself), and mediapipe's native runtime logs errors only. ``--verbose`` (or ``HICMAE_VERBOSE=1``) shows all of it live.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from preprocessing.errors import Interrupted

from .layout import shown

VERBOSE = "HICMAE_VERBOSE"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
logger = logging.getLogger("hicmae")


def verbose() -> bool:
    """Whether library output is shown live (``--verbose`` sets ``HICMAE_VERBOSE=1`` for every process)."""
    return os.environ.get(VERBOSE, "") not in ("", "0")


def quiet_libraries() -> None:
    """Library output to warnings only, unless ``verbose``: through settings that the processes a stage starts
    (Ray's, Ray Train's, Ray Data's) inherit, so call it before Ray starts."""
    loud = verbose()
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "INFO" if loud else "ERROR")  # its hints go to its own log file
    os.environ.setdefault("GLOG_minloglevel", "0" if loud else "2")  # mediapipe's native runtime (LiteRT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if loud else "2")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if loud else "WARNING")  # read when mlflow is imported
    if not loud:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the stage shows its run's URL
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # logging a model downloads its files
    # Token authentication for a local Ray, said aloud (no notice at every start). Ray reads the setting once, when
    # it is imported, and the processes of a Ray started later inherit it: in a process that imported Ray already (a
    # notebook, a script calling a stage's function) setting it now would start a GCS that asks this process for a
    # token it never made ("InvalidAuthToken"), so there Ray keeps what it read.
    if not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    for name in ("mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.INFO if loud else logging.WARNING)


class Console:
    """The lines of one stage for the person at the terminal (see the module docstring), from any process. Picklable:
    workers get ``remote_console()`` in their config and ``show`` from there. Without a queue (no stage console to
    send to: a worker started by a test or a script) it prints its lines itself."""

    def __init__(self, queue=None, show_every_s: float = 10.0):
        self.queue = queue  # a ray.util.queue.Queue to the stage's process, or None
        self.show_every_s = show_every_s  # between two progress lines within long work

    def show(self, text: str) -> None:
        """A line for the console (and the log file)."""
        self._send(logging.INFO, text)

    def detail(self, text: str) -> None:
        """A line for the log file (and the console with ``--verbose``)."""
        self._send(logging.DEBUG, text)

    def _send(self, level: int, text: str) -> None:
        if self.queue is not None:
            try:
                self.queue.put_nowait((level, text))
                return
            except Exception:  # noqa: BLE001 - the stage's process is gone: the worker prints the line itself
                pass
        if level >= logging.INFO or verbose():
            print(text, file=sys.__stdout__, flush=True)  # the process's own stdout: Ray Train's print tees


def clock(seconds: float) -> str:
    """``754`` -> ``12:34``, ``52330`` -> ``14:32:10``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def emit(level: int, text: str) -> None:
    """In the stage's process: a console line printed (details only when verbose) and logged."""
    if level >= logging.INFO or verbose():
        print(text, flush=True)
    logger.log(logging.INFO, text if level >= logging.INFO else f"  {text}")


class StageConsole(Console):
    """The stage's own console: prints and logs, and relays what other processes send (``remote``)."""

    def __init__(self, log_file: Path, show_every_s: float = 10.0):
        super().__init__(show_every_s=show_every_s)
        self.log_file = log_file
        self.began = time.perf_counter()
        self._relay: Console | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _send(self, level: int, text: str) -> None:
        emit(level, text)

    def remote(self) -> Console:
        """A Console for other processes (Ray must be running): their lines reach this process's console."""
        if self._relay is None:
            import ray
            from ray.util.queue import Queue
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # on this process's node: the queue (an actor) must not go with a worker node the cluster loses
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self._relay = Console(Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here}),
                                  self.show_every_s)
            self._thread = threading.Thread(target=self._forward, name="console", daemon=True)
            self._thread.start()
        return self._relay

    def _forward(self) -> None:
        while not self._stop.wait(0.2):
            self._flush()

    def _flush(self) -> None:
        try:
            for level, text in self._relay.queue.get_nowait_batch(self._relay.queue.qsize()):
                emit(level, text)
        except Exception:  # noqa: BLE001 - Ray shut down: nothing more can arrive
            pass

    def close(self) -> None:
        """Print what is still on its way, then stop relaying."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._flush()
            self._thread = None

    def elapsed(self) -> str:
        """The time since the stage began, as ``clock`` writes it."""
        return clock(time.perf_counter() - self.began)

    def __getstate__(self) -> dict:
        raise RuntimeError("pass remote_console() to other processes, not the stage's own console")


_current: StageConsole | None = None


def current() -> Console:
    """The console of the stage running in this process (``stage_console``), or a Console that prints."""
    return _current or Console()


def console_log() -> Path | None:
    """The log file of the stage running in this process, if any."""
    return _current.log_file if _current is not None else None


def remote_console() -> Console | None:
    """A Console for the stage's other processes (Ray workers, tasks) that sends their lines to this process's
    console; None outside a stage (they then print their own lines)."""
    return _current.remote() if _current is not None else None


@contextlib.contextmanager
def stage_console(log_file: Path, label: str, show_every_s: float = 10.0) -> Iterator[StageConsole]:
    """The console of a stage running in this process (``current()`` while it runs): logging to ``log_file`` (every
    record at INFO and above: the console's lines, the details, the libraries' warnings), warnings and errors on
    stderr too. Its last line says how long the stage took and where its log is."""
    global _current
    quiet_libraries()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    console = _current = StageConsole(log_file, show_every_s)
    outcome = "failed"
    try:
        yield console
        outcome = "done"
    except Interrupted:
        outcome = "stopped"
        raise
    finally:
        console.close()
        console.show(f"{label}: {outcome} in {console.elapsed()}  (log: {shown(log_file)})")
        _current = None
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()
