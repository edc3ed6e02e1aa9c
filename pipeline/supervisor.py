"""Running a command in a session of its own, so that a signal to the caller's process group reaches the command
as a request to stop and not the processes it started (Ray's): ``supervise``. Used by ``cli.entry`` for the training
stages (``pipeline.train.preemption`` says what they do on the request)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from preprocessing.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def supervise(run, grace_s: float) -> int:
    """Run ``run()`` (returns an exit status) in a forked child that leads a session of its own. In this process,
    return the child's exit status; in the child, ``run()``'s. SIGTERM or SIGINT to this process (or its process
    group) are passed on to the child as SIGTERM; if the child still runs ``grace_s`` seconds after the first, its
    whole session is killed (a second SIGINT kills it at once). Linux and macOS only; the caller must not have
    started threads."""
    child = os.fork()
    if child == 0:  # the stage: from here on the program it was, in a session of its own
        os.setsid()
        return run()
    deadline: list[float] = []

    def forward(number: int, frame) -> None:
        if deadline and number == signal.SIGINT:  # a second Ctrl-C: now
            deadline[0] = 0.0
        if not deadline:
            deadline.append(time.monotonic() + grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    for number in STOP_SIGNALS:
        signal.signal(number, forward)
    while True:
        with contextlib.suppress(InterruptedError):
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid == child:
                code = os.waitstatus_to_exitcode(status)
                return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says
        if deadline and time.monotonic() > deadline[0]:
            print(f"hicmae: the stage did not stop within {grace_s:g} s of the signal: killed it; it continues from "
                  "its last checkpoint", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signal.SIGKILL)
            os.waitpid(child, 0)
            return Interrupted.EXIT_STATUS
        time.sleep(0.05)
