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
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..config.params import ProgressSettings, ScalingSettings
from ..console import Console
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
    """This rank's training data: its DataLoader, optimizer steps per epoch (the same on every rank), and what
    to call before each epoch (the sampler's and datasets' ``set_epoch``)."""

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
    return {"loader_workers": scaling.loader_workers, "compile": scaling.compile,
            "checkpoint_every": scaling.checkpoint_every, "log_every_steps": progress.log_every_steps,
            "tracker": tracker, "console": console, raytrain.STOP_FILE: stop_file}


class TrainingTask:
    """What a training stage tells ``fit``. A subclass's config has the ``run_options``, which this reads; it sets
    ``settings`` (seed, epochs, batch_size, optim) and implements ``build_model``, ``train_data`` and ``losses``;
    the other hooks are optional. ``fit`` sets ``rank``, ``world_size`` and ``compile_mode`` (the mode resolved
    for the device) before any hook."""

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

    def build_model(self, rank: int) -> nn.Module:
        raise NotImplementedError

    def train_data(self) -> TrainData:
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
    """One optimisation step of a task on a batch on the device: its ``step_inputs``, the forward with every loss
    (``net``: ``step_module``, maybe DDP-wrapped; compiled, its backward too), zero_grad, backward, the optimizer
    step (``compiled.optimizer_update``), skipped when the loss (on any rank) or the gradient norm is not finite;
    each step's decision goes to the optimizer's ``divergence.SkippedSteps`` (``skipped``). Returns the detached
    (len(loss_names),) losses."""

    def __init__(self, task: TrainingTask, net: nn.Module, optimizer: torch.optim.Optimizer, mode: str):
        from .divergence import SkippedSteps, agreed

        self.task, self.net, self.optimizer = task, net, optimizer
        optim = task.settings.optim
        self.update = optimizer_update(optimizer, mode, net.parameters(), optim.clip_grad)
        self.skipped = SkippedSteps.attach(optimizer, optim.max_skipped_steps)
        self.agreed = agreed  # the loss's finiteness, the same on every rank

    def __call__(self, batch: dict, rng: np.random.Generator) -> torch.Tensor:
        batch = {**batch, **self.task.step_inputs(batch, rng, batch["video"].device)}
        loss, losses = self.net(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.skipped.add(self.update(self.agreed(torch.isfinite(loss.detach()))))
        return losses.detach()


class EpochStart(NamedTuple):
    """Where an epoch resumes within itself (a checkpoint saved on a stop request): its steps done, rank 0's
    summed losses over them, and what puts back this rank's random states as they were after them."""

    steps: int
    sums: list[float]
    restore_random: Callable[[], None]


class Stopped(NamedTuple):
    """An epoch stopped on request after ``steps`` steps (``sums``: its summed losses so far)."""

    steps: int
    sums: torch.Tensor


def train_one_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, loader, *, step: Callable, epoch: int,
                    schedule: LrSchedule, loss_names: tuple[str, ...], device: torch.device, global_batch: int,
                    progress: EpochProgress | None = None, start: EpochStart | None = None,
                    stop: Callable[[], bool] | None = None) -> dict | Stopped:
    """``schedule.steps_per_epoch`` optimizer steps (``step(batch)``), each reported to ``progress`` (rank 0's);
    returns the epoch's mean losses, last lr and throughput, or ``Stopped`` once ``stop()`` (asked after every
    step, on every rank) says so.

    From ``start`` (a checkpoint within the epoch) the loader's first ``start.steps`` batches are read and passed
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
    began = time.perf_counter()
    for index, batch in enumerate(batches(loader, schedule.steps_per_epoch)):
        if index < first:
            continue
        if start and index == first:
            start.restore_random()
        lr = schedule.at(epoch, index)
        set_lr(optimizer, lr)
        batch = device_batch(batch, device)  # the video cast, normalised, cropped and augmented there
        losses = step(batch)
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


def random_state(rng: np.random.Generator, device: torch.device) -> dict:
    """This process's random states mid-epoch: torch's (and the GPU's), the epoch's generator (``rng``), Python's
    and NumPy's global ones."""
    state = {"torch": torch.get_rng_state(), "rng": rng.bit_generator.state, "python": random.getstate(),
             "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_random_state(state: dict, rng: np.random.Generator, device: torch.device) -> None:
    """Put back what ``random_state`` saved (into ``rng``, this epoch's generator, and the global ones)."""
    torch.set_rng_state(state["torch"])
    rng.bit_generator.state = state["rng"]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def header(task: TrainingTask, model: nn.Module, device: torch.device, schedule: LrSchedule) -> str:
    """The run's first line, e.g. ``crema-d fold 3: HiCMAE hicmae_base (88.1 M parameters), 4 workers on cuda,
    compile reduce-overhead; 100 epochs of 210 steps, global batch 64``."""
    settings, world = task.settings, task.world_size
    parameters = sum(p.numel() for p in model.parameters())
    return (f"{task.label}: HiCMAE {settings.model.size} ({parameters / 1e6:.3g} M parameters), {world} "
            f"worker{'s' if world > 1 else ''} on {device.type}, compile {task.compile_mode}; {settings.epochs} epochs "
            f"of {schedule.steps_per_epoch} steps, global batch {settings.batch_size * world}")


def fit(task: TrainingTask) -> None:
    """Train ``task`` on this Ray Train worker from its last checkpoint (if any) to its last epoch, or until its
    stage asks it to stop (``preemption``): then it saves a checkpoint at that step and ends."""
    settings = task.settings
    rank, world, device = raytrain.worker_context()
    task.rank, task.world_size, task.compile_mode = rank, world, resolve(task.compile, device)
    seed_everything(settings.seed + rank)
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
    data = task.train_data()
    schedule = LrSchedule.for_run(settings.optim, epochs=settings.epochs, steps_per_epoch=data.steps_per_epoch,
                                  global_batch=settings.batch_size * world)
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
        rng = seed_epoch(settings.seed, rank, epoch)
        start = EpochStart(within["steps"], within["sums"], partial(set_random_state, restored["rank_state"], rng,
                                                                     device)) if within and first else None
        data.set_epoch(epoch)
        progress = EpochProgress(task.label, epoch, settings.epochs, schedule.steps_per_epoch,
                                 settings.batch_size * world, task.loss_names, console, tracker,
                                 log_interval(schedule.steps_per_epoch, task.config.get("log_every_steps")),
                                 task.console.show_every_s, compiling=task.compile_mode != "none" and first
                                 ) if rank == 0 else None
        metrics = train_one_epoch(net, optimizer, data.loader, epoch=epoch, schedule=schedule,
                                  step=partial(step, rng=rng), loss_names=task.loss_names, device=device,
                                  global_batch=settings.batch_size * world, progress=progress, start=start, stop=stop)
        if isinstance(metrics, Stopped):
            save_stopped(task, model, optimizer, history, epoch, metrics, schedule, random_state(rng, device))
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
                 stopped: Stopped, schedule: LrSchedule, random: dict) -> None:
    """Every rank, when its stage asked the run to stop within ``epoch``: a checkpoint at that step (rank 0's state
    with where the epoch stands, every rank's random states), whose metrics say where it stopped."""
    state = None
    if task.rank == 0:
        state = {**checkpoint_state(task, model, optimizer, history, epoch - 1),
                 "within": {"epoch": epoch, "steps": stopped.steps, "sums": stopped.sums.tolist()}}
        task.console.show(f"{task.label}: stop requested: checkpoint saved after step {stopped.steps} of epoch "
                          f"{epoch + 1}")
        if task.tracker:
            task.tracker.settle()
    raytrain.report_epoch({"epoch": epoch, raytrain.STOPPED_AT_STEP: stopped.steps,
                           "steps_per_epoch": schedule.steps_per_epoch}, state, rank_state=random,
                          name=f"checkpoint_epoch{epoch + 1:04d}_step{stopped.steps:06d}")
