"""Progress within long work: ``EpochProgress`` within a training epoch, on rank 0 (a console line every
``show_every_s`` seconds and step metrics to MLflow every ``log_every`` steps, queued by the tracker and delivered
in the background: the step never waits on the server), and ``counter`` for a count of items (clips preprocessed,
files hashed).

The losses stay on the device between those points (summed there, as the epoch's are): reading them is the only host
sync, once per line or logged step, so a run's first hours on a GPU have a curve and a sign of life without the
loop waiting on the device at every step. samples/s is measured between two such reads, so it is the device's rate.

    pretrain voxceleb2: epoch 3/100  step 2100/6822  loss 0.8341  1312 samples/s  ETA 10:47 (run 14:36:12)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .console import Console, clock, current

if TYPE_CHECKING:
    import torch

POINTS_PER_EPOCH = 20  # step metrics of an epoch when ``log_every_steps`` is not set


def log_interval(steps_per_epoch: int, log_every_steps: int | None) -> int:
    """Steps between two logged points: ``log_every_steps``, or about POINTS_PER_EPOCH points an epoch."""
    return log_every_steps or max(1, steps_per_epoch // POINTS_PER_EPOCH)


@dataclass
class EpochProgress:
    """One epoch's progress reporting; ``step`` after every optimizer step with its detached losses (on the device)."""

    label: str
    epoch: int
    epochs: int
    steps: int
    global_batch: int
    loss_names: tuple[str, ...]
    console: object = None        # pipeline.console.Console (rank 0) or None
    tracker: object = None        # tracking.RunLogger (rank 0) or None
    log_every: int = 1
    show_every_s: float = 10.0
    compiling: bool = False       # the first step compiles the step's graphs: said as such, left out of the rates
    window: torch.Tensor | None = None  # the losses summed since the last point, on the device
    window_steps: int = 0
    timed_steps: int = 0                # of those, the steps after window_began (not the compiling one)
    window_began: float = field(default_factory=time.perf_counter)
    last_shown: float = field(default_factory=time.perf_counter)
    seconds_per_step: float | None = None

    def __post_init__(self) -> None:
        report_to = getattr(self.tracker, "report_to", None)  # a RunLogger: its lines (tracking behind) go here too
        if report_to is not None and self.console is not None:
            report_to(self.console)

    def step(self, index: int, losses: torch.Tensor, lr: float) -> None:
        self.window = losses.clone() if self.window is None else self.window + losses
        self.window_steps += 1
        self.timed_steps += 1
        if self.compiling:
            losses.tolist()  # waits for the step: its compilation and first run
            now = time.perf_counter()
            if self.console is not None:
                self.console.show(f"{self.label}: the step compiled and ran in {clock(now - self.window_began)}")
            self.compiling, self.timed_steps, self.window_began, self.last_shown = False, 0, now, now
        now = time.perf_counter()
        log_due = self.tracker is not None and (index + 1) % self.log_every == 0
        show_due = (self.console is not None and index + 1 < self.steps and self.timed_steps
                    and now - self.last_shown >= self.show_every_s)
        if not (log_due or show_due):
            return
        means = (self.window / self.window_steps).tolist()  # the one host sync
        now = time.perf_counter()
        rate = None
        if self.timed_steps:
            self.seconds_per_step = (now - self.window_began) / self.timed_steps
            rate = self.global_batch / self.seconds_per_step
        if log_due:
            metrics = {f"train_step/{name}": value for name, value in zip(self.loss_names, means, strict=True)}
            metrics["train_step/lr"] = lr
            if rate is not None:
                metrics["train_step/samples_per_s"] = rate
            self.tracker.log(metrics, self.epoch * self.steps + index + 1)
        if show_due:
            self.console.show(self.line(index, means[0], rate))
            self.last_shown = now
        self.window, self.window_steps, self.timed_steps, self.window_began = None, 0, 0, now

    def line(self, index: int, loss: float, rate: float) -> str:
        left = (self.steps - index - 1) * self.seconds_per_step
        run_left = left + (self.epochs - self.epoch - 1) * self.steps * self.seconds_per_step
        return (f"{self.label}: epoch {self.epoch + 1}/{self.epochs}  step {index + 1}/{self.steps}  loss {loss:.4g}  "
                f"{rate:.4g} samples/s  ETA {clock(left)} (run {clock(run_left)})")


class Counter:
    """The progress of a count as console lines, ``tqdm``'s interface where there is no terminal to redraw a bar on
    (a log, CI, ``dvc repro`` piped): a line every ``show_every_s`` seconds and one at the end, e.g.

        preprocess demo: 40/100 clips  3.2 clips/s  2 failed  ETA 0:18
    """

    def __init__(self, iterable: Iterable | None = None, *, total: int, initial: int = 0, unit: str = "it",
                 desc: str = "", disable: bool = False, console: Console | None = None, **_):
        self.iterable, self.total, self.n, self.unit, self.desc = iterable, total, initial, unit, desc
        self.disable, self.console = disable, console or current()
        self.postfix, self.began, self.first = "", time.perf_counter(), initial
        self.last_shown = self.began

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last_shown >= self.console.show_every_s and self.n < self.total:
            self._show()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        if self.n > self.first:
            self._show()
        self.first = self.n  # a second close says nothing

    def _show(self) -> None:
        self.last_shown = now = time.perf_counter()
        if self.disable:
            return
        rate = (self.n - self.first) / max(now - self.began, 1e-9)
        left = f"  ETA {clock((self.total - self.n) / rate)}" if self.n < self.total and rate > 0 else ""
        postfix = f"  {self.postfix}" if self.postfix else ""
        self.console.show(f"{self.desc}: {self.n}/{self.total} {self.unit}s  {rate:.3g} {self.unit}s/s{postfix}{left}")

    def __enter__(self) -> Counter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def counter(iterable: Iterable | None = None, **options):
    """A progress bar (``tqdm``) on a terminal, else a ``Counter``; ``options`` as tqdm takes them."""
    if sys.stdout.isatty():
        from tqdm import tqdm

        return tqdm(iterable, **options)
    return Counter(iterable, **options)
