"""Stopping a training stage when the cluster takes its machines back, so that it continues where it stopped.

A scheduler preempting a job (Slurm, Kubernetes, a spot instance being reclaimed) or a person pressing Ctrl-C
sends SIGTERM or SIGINT, usually to the stage's whole process group, and kills what is left some seconds later.
What happens then:

- the ``hicmae`` command (``cli.entry``, ``supervisor.supervise``) runs a training stage in a child process in a
  session of its own, so the signal reaches the command and not the stage's Ray processes; it passes it on to the
  stage and, if the stage has not ended ``scaling.stop_grace_s`` seconds later, kills the stage's whole session;
- the stage (``on_signals``) marks its ``StopFile``; the rank-0 worker of every training run notices it between
  two steps (``StopCheck``), all ranks agree on the step, save a checkpoint there (the model, optimizer, the epoch's
  partial sums and every rank's random states: ``loop.fit``) and end;
- the stage then ends with ``Preempted``: one line saying where it stopped and how to continue, exit status
  ``EXIT_PREEMPTED``. Run again with the same inputs (``dvc repro`` does), it continues from that checkpoint
  (``resume``) and ends with the weights of a run that was never stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from preprocessing.errors import Interrupted

from ..supervisor import STOP_SIGNALS

EXIT_PREEMPTED = Interrupted.EXIT_STATUS


class Preempted(Interrupted):
    """A training stage stopped on request (SIGTERM, Ctrl-C) after saving a checkpoint; the message says how to
    continue. The command prints it as its one line and exits with ``EXIT_PREEMPTED``."""


class StopFile:
    """The file whose existence asks a stage's training runs to stop at their next step boundary. It lies beside
    the runs' checkpoints (``storage``), where every worker of a run can see it: on a cluster that storage is
    shared."""

    def __init__(self, storage: str | Path):
        self.path = Path(storage) / ".stop" / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.signal: str | None = None  # the name of the signal that asked, once one did

    def request(self, reason: str) -> None:
        self.signal = self.signal or reason
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.signal)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def stop_reason(path: str | None) -> str:
    """What asked the runs of a stop file to stop (a signal's name), as the file says."""
    try:
        return Path(path).read_text().strip() or "a stop request" if path else "a stop request"
    except OSError:
        return "a stop request"


@contextlib.contextmanager
def on_signals(storage: str | Path) -> Iterator[StopFile]:
    """While the block runs, SIGTERM and SIGINT mark a new ``StopFile`` under ``storage`` instead of ending this
    process. Ray's own handlers (which end the process with a stack dump) are replaced, so call it after Ray
    started (``ray_runtime.start_ray``); the previous handlers are back afterwards."""
    stop = StopFile(storage)

    def handle(number: int, frame) -> None:
        stop.request(signal.Signals(number).name)

    previous = {number: signal.signal(number, handle) for number in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        stop.remove()


class StopCheck:
    """Called by every rank of a training run after each step: True on all ranks at the same step once the run's
    stop file exists. Rank 0 looks at the file (at most every ``poll_s`` seconds); a MAX all-reduce over a CPU (gloo)
    process group tells the others, without waiting on the accelerator."""

    def __init__(self, path: str | None, rank: int, world_size: int, poll_s: float = 0.2):
        self.path, self.rank, self.world_size, self.poll_s = path, rank, world_size, poll_s
        self.looked = 0.0
        self.group = None
        if path and world_size > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")  # every rank calls this, in the same order

    def _asked(self) -> bool:
        if self.rank != 0 or not self.path:
            return False
        now = time.monotonic()
        if now - self.looked < self.poll_s:
            return False
        self.looked = now
        return os.path.exists(self.path)

    def __call__(self) -> bool:
        if not self.path:
            return False
        if self.group is None:
            return self._asked()
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(self._asked())])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
