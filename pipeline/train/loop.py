"""The epoch loop both training stages share, run by every Ray Train worker (``fit``).

A stage says what differs in a ``TrainingTask``: its model, its training data, its losses (and the random
draws a step makes on the host), what it measures at the end of an epoch (fine-tuning: validation), what it
adds to a checkpoint and which files its last checkpoint carries. ``fit`` does the rest the same way for both:
seeding, DDP, resuming from the last checkpoint, the step (``TrainStep``: forward with every loss, backward,
optimizer step, compiled as ``scaling.compile`` says), the per-step learning rate, throughput, the per-epoch
history and MLflow metrics, and the checkpoints (through ``raytrain.report_epoch``).

Exact resume: every epoch's random draws (dropout, drop path, mixup, the data's shuffles, windows and
augmentations) derive from (seed, rank, epoch) alone, so a run resumed from a checkpoint draws exactly what
the uninterrupted run would have, on every rank.

Micro-batches (``scaling.accum_steps`` = A, gradient accumulation): an optimizer step of a worker is A forward and
backward passes, micro-batch m of rank r being virtual rank ``r * A + m`` of a run with ``world * A`` ranks: its own
training data (``TrainingTask.train_data`` of that rank), its own random states (``MicroBatchRandom``), the
contrastive negatives and Mixup partners of its own clips, its loss divided by A so that the gradients sum to the
mean DDP takes over that many ranks, and no all-reduce before the last one (``no_sync``). A run of W workers x A
micro-batches therefore computes what W x A workers would, with the reference's per-GPU batch, within float32
rounding (the same gradients summed in another order; bit for bit where the order is the same, e.g. 1 x 2 and
2 x 1).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..config.params import ProgressSettings, ScalingSettings
from ..console import Console
from ..data.sampling import micro_batch_ranks
from ..data.video_batch import device_batch
from ..history import history_csv
from ..layout import HISTORY_FILE
from ..progress import EpochProgress, log_interval
from . import raytrain
from .compiled import compile_counters, compiled, optimizer_update, resolve
from .optim import LrSchedule, build_optimizer, set_lr, tensor_lrs
from .preemption import StopCheck


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, rank: int, epoch: int) -> np.random.Generator:
    """Seed Python, NumPy and torch for one epoch of one rank; returns a generator for the loop's own draws."""
    sequence = np.random.SeedSequence([seed, rank, epoch])
    seed_everything(int(sequence.generate_state(1, np.uint64)[0]))
    return np.random.default_rng(sequence)


def global_random_state(device: torch.device) -> dict:
    """This process's global random states: torch's (and the GPU's), Python's and NumPy's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_global_random_state(state: dict, device: torch.device) -> None:
    """Put back what ``global_random_state`` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class MicroBatchRandom:
    """The random states of one rank's micro-batches in one epoch, each seeded as the rank it stands for
    (``seed_epoch`` of virtual rank ``ranks[m]``): ``use(m)`` makes micro-batch m's the process's global states
    (those of the others kept aside) and returns its generator for the loop's own draws. Everything a micro-batch
    draws (its loader's, its host draws, dropout and drop path in its forward) is thus drawn from its own states, in
    the order that rank would draw it. One micro-batch: its states are simply the process's, never swapped.

    A CUDA graph replay reads the generator's seed and offset when it is launched, so swapping the GPU's state
    between micro-batches holds for compiled steps too."""

    def __init__(self, seed: int, ranks: list[int], epoch: int, device: torch.device):
        self.device = device
        self.rngs, self.kept = [], []
        for rank in ranks:
            self.rngs.append(seed_epoch(seed, rank, epoch))
            self.kept.append(global_random_state(device) if len(ranks) > 1 else None)
        self.active = len(ranks) - 1  # the global states are the last one's

    def use(self, micro: int) -> np.random.Generator:
        if micro != self.active:
            self.kept[self.active] = global_random_state(self.device)
            set_global_random_state(self.kept[micro], self.device)
            self.active = micro
        return self.rngs[micro]

    def state(self) -> list[dict]:
        """Every micro-batch's states as they stand (a checkpoint within an epoch)."""
        self.kept[self.active] = global_random_state(self.device)
        return [{**kept, "rng": rng.bit_generator.state} for kept, rng in zip(self.kept, self.rngs, strict=True)]

    def restore(self, states: list[dict]) -> None:
        """Put back what ``state`` saved."""
        if len(states) != len(self.rngs):
            raise ValueError(f"the checkpoint holds the random states of {len(states)} micro-batches, this run has "
                             f"{len(self.rngs)}")
        for micro, state in enumerate(states):
            self.rngs[micro].bit_generator.state = state["rng"]
            self.kept[micro] = {key: value for key, value in state.items() if key != "rng"}
        set_global_random_state(self.kept[self.active], self.device)


def batches(loader, count: int) -> Iterator[dict]:
    """Exactly ``count`` batches, re-iterating the loader when a rank's share runs out (keeps DDP in step)."""
    produced = 0
    while produced < count:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            produced += 1
            if produced == count:
                return
        if empty:
            raise RuntimeError("the data loader produced no batch: too few clips for this batch size and rank")


class TrainData(NamedTuple):
    """A rank's training data: its DataLoader, optimizer steps per epoch (the same on every rank), and what to call
    before each epoch (the sampler's and datasets' ``set_epoch``)."""

    loader: object
    steps_per_epoch: int
    set_epoch: Callable[[int], None]


def run_options(scaling: ScalingSettings | None = None, progress: ProgressSettings | None = None, tracker=None,
                console: Console | None = None, stop_file: str | None = None) -> dict:
    """How a training run runs, as its workers' config holds it (beside what it computes): loader processes,
    compile mode and checkpoints (``scaling``), where its metrics (``tracker``: a ``tracking.RunLogger``) and its
    console lines go (``console.remote_console()``), and how often (``progress``), and the file whose existence
    asks it to stop (``preemption.StopFile``)."""
    scaling, progress = scaling or ScalingSettings(), progress or ProgressSettings()
    return {"loader_workers": scaling.loader_workers, "compile": scaling.compile, "accum_steps": scaling.accum_steps,
            "checkpoint_every": scaling.checkpoint_every, "log_every_steps": progress.log_every_steps,
            "tracker": tracker, "console": console, raytrain.STOP_FILE: stop_file}


class TrainingTask:
    """What a training stage tells ``fit``. A subclass's config has the ``run_options``, which this reads; it sets
    ``settings`` (seed, epochs, batch_size, optim) and implements ``build_model``, ``train_data`` and ``losses``;
    the other hooks are optional. ``fit`` sets ``rank``, ``world_size`` (the Ray Train worker's) and
    ``compile_mode`` (the mode resolved for the device) before any hook; ``accum_steps`` is the config's."""

    loss_names: tuple[str, ...] = ("loss",)
    label = "training"  # names the run in the console lines, e.g. "crema-d fold 3"
    settings = None
    compile_mode = "none"
    precision: str | None = None  # autocast's: None = bf16 on a GPU, float32 on a CPU (``autocast``)
    rank, world_size = 0, 1

    def __init__(self, config: dict):
        self.config = config
        self.tracker = config.get("tracker")          # an MLflow RunLogger, or None
        self.console = config.get("console") or Console()
        self.compile = config.get("compile", "none")  # a scaling.compile mode
        self.accum_steps = config.get("accum_steps", 1)  # micro-batches per optimizer step (scaling.accum_steps)

    def build_model(self, rank: int) -> nn.Module:
        raise NotImplementedError

    def train_data(self, rank: int, world_size: int) -> TrainData:
        """The training data of ``rank`` in a run of ``world_size`` ranks: with micro-batches, micro-batch m of
        worker r reads that of rank ``r * accum_steps + m`` of ``world_size * accum_steps``."""
        raise NotImplementedError

    def step_inputs(self, batch: dict, rng: np.random.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        """The step's random draws that happen on the host (``rng``: the epoch's generator), as tensors on the
        device to merge into the batch (fine-tuning: the Mixup/CutMix weights). None by default."""
        return {}

    def losses(self, net: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward with every loss on a batch on the device (``step_inputs`` merged in): (the loss to
        minimise, the (len(loss_names),) losses to report). ``TrainStep`` compiles it: tensor ops only, the same
        shapes every step."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, device: torch.device, epoch: int) -> dict:
        """Every rank, after each epoch's training, with the model itself (no DDP): metrics to add to the epoch's
        (e.g. ``val/...``). A distributed evaluation splits the clips across the ranks and gathers the outputs (a
        collective)."""
        return {}

    def checkpoint_due(self, epoch: int) -> bool:
        """Whether rank 0 checkpoints after ``epoch`` (the last epoch always is)."""
        return True

    def state(self) -> dict:
        """The task's own state, saved in every checkpoint (merged into ``state.pt``)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Take back the task's own state from a restored checkpoint."""

    def final_files(self, model: nn.Module, device: torch.device) -> dict[str, bytes]:
        """Every rank, after the last epoch (a collective, as ``evaluate``): result files; rank 0's go into the
        last checkpoint."""
        return {}


PROGRESS_METRICS = ("train/loss", "val/uar", "val/war", "val/ccc_mean", "samples_per_s")
# Figures of how a run went rather than of what it learnt: MLflow and the progress lines get them, the outputs DVC
# tracks (history.csv, metrics.json) do not, so that the same inputs give the same outputs.
RUN_FIGURES = ("samples_per_s", "compile/", "train/skipped_steps")


def results_only(metrics: dict) -> dict:
    """``metrics`` without the ``RUN_FIGURES`` (names, or prefixes ending in '/')."""
    return {name: value for name, value in metrics.items()
            if not any(name == f or (f.endswith("/") and name.startswith(f)) for f in RUN_FIGURES)}


def progress_line(label: str, epoch: int, epochs: int, metrics: dict) -> str:
    """One line per epoch, e.g. ``crema-d fold 3: epoch 4/50  train/loss 1.21  val/uar 0.52  ...``."""
    shown = "  ".join(f"{name} {metrics[name]:.4g}" for name in PROGRESS_METRICS if name in metrics)
    return f"{label}: epoch {epoch + 1}/{epochs}  {shown}"


class StepModule(nn.Module):
    """A task's forward with every loss as one module, ``batch -> task.losses(model, batch)``: what torch.compile
    compiles as one graph and, when there are several workers, DDP then wraps (a compiled module inside DDP: DDP's
    own Python forward stays outside the graph). Its only parameters are the model's."""

    def __init__(self, task: TrainingTask, model: nn.Module):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.losses(self.model, batch)


def step_module(task: TrainingTask, model: nn.Module, mode: str) -> nn.Module:
    """``StepModule`` of the task's model, compiled in ``mode`` (``compiled.compiled``)."""
    return compiled(StepModule(task, model), mode)


class TrainStep:
    """One optimisation step of a task on its micro-batches (``task.accum_steps`` of them, on the device, each with
    the generator of its host draws): zero_grad, then for each its ``step_inputs``, the forward with every loss
    (``net``: ``step_module``, maybe DDP-wrapped; compiled, its backward too) and the backward of its loss divided by
    the number of micro-batches (DDP all-reduces after the last one only: ``no_sync``); then the optimizer step
    (``compiled.optimizer_update``), skipped when a loss (of any micro-batch, on any rank) or the gradient norm is
    not finite; each step's decision goes to the optimizer's ``divergence.SkippedSteps`` (``skipped``). Returns the
    first micro-batch's detached (len(loss_names),) losses: what its rank (``rank * accum_steps``) would report."""

    def __init__(self, task: TrainingTask, net: nn.Module, optimizer: torch.optim.Optimizer, mode: str):
        from .divergence import SkippedSteps, agreed

        self.task, self.net, self.optimizer = task, net, optimizer
        optim = task.settings.optim
        self.update = optimizer_update(optimizer, mode, net.parameters(), optim.clip_grad)
        self.skipped = SkippedSteps.attach(optimizer, optim.max_skipped_steps)
        self.agreed = agreed  # the loss's finiteness, the same on every rank

    def __call__(self, micro_batches: Iterable[tuple[dict, np.random.Generator]]) -> torch.Tensor:
        count = self.task.accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        finite = reported = None
        for micro, (batch, rng) in enumerate(micro_batches):
            batch = {**batch, **self.task.step_inputs(batch, rng, batch["video"].device)}
            with self.no_sync(micro < count - 1):
                loss, losses = self.net(batch)
                (loss / count if count > 1 else loss).backward()  # a power of two divides exactly
            ok = torch.isfinite(loss.detach())
            finite = ok if finite is None else finite & ok
            if reported is None:  # a copy when more follow: a CUDA graph's next replay reuses its outputs' memory
                reported = losses.detach().clone() if count > 1 else losses.detach()
        self.skipped.add(self.update(self.agreed(finite)))
        return reported

    def no_sync(self, accumulate: bool):
        """DDP's ``no_sync`` (gradients kept on this rank) for a micro-batch before the last one."""
        ddp = isinstance(self.net, nn.parallel.DistributedDataParallel)
        return self.net.no_sync() if accumulate and ddp else nullcontext()


class EpochStart(NamedTuple):
    """Where an epoch resumes within itself (a checkpoint saved on a stop request): its steps done, rank 0's
    summed losses over them, and what puts back this rank's random states (every micro-batch's) as they were after
    them."""

    steps: int
    sums: list[float]
    restore_random: Callable[[], None]


class Stopped(NamedTuple):
    """An epoch stopped on request after ``steps`` steps (``sums``: its summed losses so far)."""

    steps: int
    sums: torch.Tensor


def micro_batches(streams: list[Iterator[dict]], draws: MicroBatchRandom | None,
                  device: torch.device) -> Iterator[tuple[dict, np.random.Generator | None]]:
    """A step's micro-batches on the device, each with its generator: the next batch of each stream, read (its
    loader started, on the first) and moved under that micro-batch's random states (``draws``; None: the
    process's, and no generator)."""
    for micro, stream in enumerate(streams):
        rng = draws.use(micro) if draws is not None else None
        yield device_batch(next(stream), device), rng  # the video cast, normalised, cropped and augmented there


def train_one_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, loaders: list, *, step: Callable,
                    epoch: int, schedule: LrSchedule, loss_names: tuple[str, ...], device: torch.device,
                    global_batch: int, draws: MicroBatchRandom | None = None, progress: EpochProgress | None = None,
                    start: EpochStart | None = None, stop: Callable[[], bool] | None = None) -> dict | Stopped:
    """``schedule.steps_per_epoch`` optimizer steps (``step(micro_batches)``: one batch of each of ``loaders``,
    the micro-batches, with the generators of ``draws``), each reported to ``progress`` (rank 0's); returns the
    epoch's mean losses, last lr and throughput, or ``Stopped`` once ``stop()`` (asked after every step, on every
    rank) says so.

    From ``start`` (a checkpoint within the epoch) the loaders' first ``start.steps`` batches are read and passed
    over, then the random states are put back: every draw of a batch is the clip's own (``windows.sample_rng``), so
    the steps that follow see what they would have seen in a run never stopped.

    A step that ``TrainStep`` skipped (a non-finite loss or gradient norm: ``divergence``) is counted, not averaged:
    ``train/skipped_steps``; a run that keeps skipping stops with ``TrainingDiverged`` (checked a few times an
    epoch, the same steps on every rank)."""
    from .divergence import SkippedSteps

    net.train()
    first = start.steps if start else 0
    # summed on the device, no host sync per step: the losses of the steps applied, then the count of those skipped
    sums = torch.tensor(start.sums if start else [0.0] * (len(loss_names) + 1), device=device)
    skipped = SkippedSteps.of(optimizer)  # TrainStep's record of the steps it did not apply (None: another step)
    if skipped is not None:
        skipped.start_epoch(first)
    check_every = log_interval(schedule.steps_per_epoch, None)
    streams = [batches(loader, schedule.steps_per_epoch) for loader in loaders]
    began = time.perf_counter()
    for index in range(schedule.steps_per_epoch):
        if index < first:
            for stream in streams:
                next(stream)
            continue
        if start and index == first:
            start.restore_random()
        lr = schedule.at(epoch, index)
        set_lr(optimizer, lr)
        losses = step(micro_batches(streams, draws, device))
        if skipped is None:
            sums[:-1] += losses
        else:
            sums += torch.cat([skipped.applied(losses), skipped.last.to(sums.dtype)[None]])
        if progress is not None:
            progress.step(index, losses, lr)
        if skipped is not None and (index + 1) % check_every == 0:
            skipped.check(epoch)  # a host sync, a few times an epoch
        if stop is not None and stop():
            return Stopped(index + 1, sums)
    if first == schedule.steps_per_epoch and start:  # stopped after the epoch's last step: nothing left to run
        start.restore_random()
    seconds = time.perf_counter() - began
    if skipped is not None:
        skipped.check(epoch)
    *totals, count = sums.tolist()
    applied = schedule.steps_per_epoch - count
    means = {f"train/{name}": total / applied if applied else float("nan")
             for name, total in zip(loss_names, totals, strict=True)}
    if count and progress is not None and progress.console is not None:
        progress.console.show(f"{progress.label}: epoch {epoch + 1}/{progress.epochs}: {count:.0f} of "
                              f"{schedule.steps_per_epoch} steps skipped (a non-finite loss or gradient norm)")
    return {"epoch": epoch, **means, "train/skipped_steps": int(count), "lr": float(optimizer.param_groups[0]["lr"]),
            "samples_per_s": (schedule.steps_per_epoch - first) * global_batch / seconds}


def global_batch(task: TrainingTask) -> int:
    """Clips per optimizer step over all workers and micro-batches."""
    return task.settings.batch_size * task.world_size * task.accum_steps


def header(task: TrainingTask, model: nn.Module, device: torch.device, schedule: LrSchedule) -> str:
    """The run's first line, e.g. ``crema-d fold 3: HiCMAE hicmae_base (88.1 M parameters), 1 worker on cuda,
    compile reduce-overhead; 100 epochs of 210 steps, global batch 56 (14 x 1 worker x 4 micro-batches)``."""
    settings, world, accum = task.settings, task.world_size, task.accum_steps
    parameters = sum(p.numel() for p in model.parameters())
    split = f" ({settings.batch_size} x {world} worker{'s' if world > 1 else ''} x {accum} micro-batches)"
    return (f"{task.label}: HiCMAE {settings.model.size} ({parameters / 1e6:.3g} M parameters), {world} "
            f"worker{'s' if world > 1 else ''} on {device.type}, compile {task.compile_mode}; {settings.epochs} epochs "
            f"of {schedule.steps_per_epoch} steps, global batch {global_batch(task)}{split if accum > 1 else ''}")


def fit(task: TrainingTask) -> None:
    """Train ``task`` on this Ray Train worker from its last checkpoint (if any) to its last epoch, or until its
    stage asks it to stop (``preemption``): then it saves a checkpoint at that step and ends."""
    settings = task.settings
    rank, world, device = raytrain.worker_context()
    task.rank, task.world_size, task.compile_mode = rank, world, resolve(task.compile, device)
    ranks = micro_batch_ranks(rank, task.accum_steps)  # the ranks its micro-batches stand for
    seed_everything(settings.seed + ranks[0])
    model = task.build_model(rank)
    net = raytrain.prepare_model(step_module(task, model, task.compile_mode))  # on the device, DDP when several
    compiled_update = task.compile_mode != "none" and device.type == "cuda"  # see compiled.optimizer_update
    optimizer = build_optimizer(model, settings.optim, compiled=compiled_update)
    tracker, console = (task.tracker, task.console) if rank == 0 else (None, None)
    restored = raytrain.restore_checkpoint(model, optimizer, rank, tracker) or {}
    within = restored.get("within")  # a checkpoint saved within an epoch: {"epoch", "steps", "sums"}
    if compiled_update:
        tensor_lrs(optimizer, device)
    task.load_state(restored)
    history = restored.get("history", [])  # rank 0's per-epoch metrics, kept in the checkpoints
    data = [task.train_data(virtual, world * task.accum_steps) for virtual in ranks]
    schedule = LrSchedule.for_run(settings.optim, epochs=settings.epochs, steps_per_epoch=data[0].steps_per_epoch,
                                  global_batch=global_batch(task))
    step = TrainStep(task, net, optimizer, task.compile_mode)
    stop = StopCheck(task.config.get(raytrain.STOP_FILE), rank, world)
    if console:
        console.show(header(task, model, device, schedule))
        if restored:
            console.show(f"{task.label}: resumes from its checkpoint after " + (
                f"step {within['steps']} of epoch {within['epoch'] + 1} (the epoch's first {within['steps']} batches "
                "of data are read again)" if within else f"epoch {restored['epoch'] + 1}"))

    first_epoch = within["epoch"] if within else restored.get("epoch", -1) + 1
    for epoch in range(first_epoch, settings.epochs):
        first = epoch == first_epoch
        draws = MicroBatchRandom(settings.seed, ranks, epoch, device)
        start = EpochStart(within["steps"], within["sums"], partial(draws.restore, restored["rank_state"])
                           ) if within and first else None
        for part in data:
            part.set_epoch(epoch)
        progress = EpochProgress(task.label, epoch, settings.epochs, schedule.steps_per_epoch,
                                 global_batch(task), task.loss_names, console, tracker,
                                 log_interval(schedule.steps_per_epoch, task.config.get("log_every_steps")),
                                 task.console.show_every_s, compiling=task.compile_mode != "none" and first
                                 ) if rank == 0 else None
        metrics = train_one_epoch(net, optimizer, [part.loader for part in data], step=step, epoch=epoch,
                                  schedule=schedule, loss_names=task.loss_names, device=device,
                                  global_batch=global_batch(task), draws=draws, progress=progress, start=start,
                                  stop=stop)
        if isinstance(metrics, Stopped):
            save_stopped(task, model, optimizer, history, epoch, metrics, schedule, draws.state())
            return
        metrics |= task.evaluate(model, device, epoch)
        last = epoch == settings.epochs - 1
        files = task.final_files(model, device) if last else None
        if task.compile_mode != "none":  # graphs so far in this process: more in a later epoch = a recompile
            metrics |= {f"compile/{name}": value for name, value in compile_counters().items()}
        state = None
        if rank == 0:
            console.show(progress_line(task.label, epoch, settings.epochs, metrics))
            history.append(results_only(metrics))
            if tracker:
                tracker.log_epoch(metrics, epoch)
            if last or task.checkpoint_due(epoch):
                state = checkpoint_state(task, model, optimizer, history, epoch)
            if last:
                files[HISTORY_FILE] = history_csv(history)
            if tracker and state is not None:
                tracker.settle()  # the run's metrics up to this checkpoint in MLflow, unless it is away
        raytrain.report_epoch(metrics, state, files if rank == 0 else None)


def checkpoint_state(task: TrainingTask, model: nn.Module, optimizer: torch.optim.Optimizer, history: list,
                     epoch: int) -> dict:
    """What rank 0 saves after ``epoch``: the model, the optimizer, the history so far and the task's own state."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
            "config": model.cfg.to_dict(), **task.state()}


def save_stopped(task: TrainingTask, model: nn.Module, optimizer: torch.optim.Optimizer, history: list, epoch: int,
                 stopped: Stopped, schedule: LrSchedule, draws: list[dict]) -> None:
    """Every rank, when its stage asked the run to stop within ``epoch``: a checkpoint at that step (rank 0's state
    with where the epoch stands, every rank's random states: ``MicroBatchRandom.state``), whose metrics say where it
    stopped."""
    state = None
    if task.rank == 0:
        state = {**checkpoint_state(task, model, optimizer, history, epoch - 1),
                 "within": {"epoch": epoch, "steps": stopped.steps, "sums": stopped.sums.tolist()}}
        task.console.show(f"{task.label}: stop requested: checkpoint saved after step {stopped.steps} of epoch "
                          f"{epoch + 1}")
        if task.tracker:
            task.tracker.settle()
    raytrain.report_epoch({"epoch": epoch, raytrain.STOPPED_AT_STEP: stopped.steps,
                           "steps_per_epoch": schedule.steps_per_epoch}, state, rank_state=draws,
                          name=f"checkpoint_epoch{epoch + 1:04d}_step{stopped.steps:06d}")
