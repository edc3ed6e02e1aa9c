"""A run that diverges: its non-finite steps skipped and counted, its end when it keeps diverging, and checkpoints
that never hold a non-finite value.

A step whose loss or gradient norm is not finite (inf or NaN: too high a learning rate, a bad batch, bf16 overflow,
as users of this model family report in VoxCeleb2 pre-training) is not applied. ``compiled.optimizer_update``
decides on the device and leaves the weights and the optimizer's state (AdamW's moments and step count) exactly as
they were, so the next finite step is the one it would have been had the bad batch never come. The reference stops
the process at the first non-finite loss; a single bad batch does not end ours:

- ``TrainStep`` adds every step's decision to the optimizer's ``SkippedSteps`` (on the device: no host sync per
  step), and the epoch counts the skipped steps beside its losses (``train/skipped_steps``, an epoch metric; the mean
  losses are over the steps applied);
- ``optim.max_skipped_steps`` skipped steps in a row stop the run with ``TrainingDiverged``, one line naming the
  epoch and step. The loop reads the counter where it syncs anyway: a few times an epoch and at its end;
- a checkpoint is refused (``refuse_nonfinite``) if a tensor of its state is not finite.
"""

from __future__ import annotations

import weakref

import torch

from preprocessing.errors import InputError


class TrainingDiverged(InputError, RuntimeError):
    """A run that kept diverging: the message names the epoch and step, and what to change."""


class NonFiniteCheckpoint(InputError, RuntimeError):
    """A checkpoint whose state holds an inf or NaN: it is not saved (the run diverged)."""


class SkippedSteps:
    """The steps of a run that were not applied (``add``: each step's decision, a 0-d bool tensor), on the device:
    ``last``, the latest decision; ``run``, the skipped steps in a row up to it; ``stop``, the step of this epoch at
    which ``run`` reached ``limit`` (-1 while it has not). ``check`` reads ``stop`` (a host sync) and raises
    ``TrainingDiverged`` when set. One per optimizer (``attach``, ``of``)."""

    _by_optimizer: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, limit: int, device: torch.device):
        self.limit = limit
        self.last = torch.zeros((), dtype=torch.bool, device=device)
        self.run = torch.zeros((), dtype=torch.int64, device=device)
        self.stop = torch.full((), -1, dtype=torch.int64, device=device)
        self.index = 0  # the epoch's step that the next ``add`` is

    @classmethod
    def attach(cls, optimizer: torch.optim.Optimizer, limit: int) -> SkippedSteps:
        """A new record of ``optimizer``'s skipped steps, on its parameters' device; ``of(optimizer)`` finds it."""
        device = next((p.device for group in optimizer.param_groups for p in group["params"]), torch.device("cpu"))
        cls._by_optimizer[optimizer] = record = cls(limit, device)
        return record

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> SkippedSteps | None:
        return cls._by_optimizer.get(optimizer)

    def start_epoch(self, step: int = 0) -> None:
        """An epoch begins (at ``step``, when it resumes within itself); the run of skipped steps goes on."""
        self.index = step
        self.stop.fill_(-1)

    def add(self, skip: torch.Tensor) -> None:
        self.last = skip.clone()  # a copy: an output of a CUDA graph is overwritten when the graph runs again
        skipped = skip.to(self.run.dtype)
        self.run.mul_(skipped).add_(skipped)  # one more in a row, or none
        self.stop.copy_(torch.where((self.run >= self.limit) & (self.stop < 0), self.index, self.stop))
        self.index += 1

    def applied(self, losses: torch.Tensor) -> torch.Tensor:
        """``losses`` of the latest step if it was applied, zeros if it was skipped (its losses are not finite)."""
        return torch.where(self.last, torch.zeros_like(losses), losses)

    def check(self, epoch: int) -> None:
        """Raise ``TrainingDiverged`` if ``limit`` steps in a row were skipped (a host sync)."""
        stop = int(self.stop)
        if stop >= 0:
            raise TrainingDiverged(
                f"training diverged at epoch {epoch + 1}, step {stop + 1}: {self.limit} steps in a row had a "
                "non-finite loss or gradient norm and were skipped (optim.max_skipped_steps); lower optim.lr or set "
                "optim.clip_grad, and run again from the last checkpoint")


def agreed(finite: torch.Tensor) -> torch.Tensor:
    """``finite`` (a 0-d bool tensor) true on every rank of the process group, when there is one with several
    ranks (the gradients are averaged over the ranks, so their norm is the same on all; a loss is each rank's own):
    every rank then skips the same steps. No host sync."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return finite
    flag = finite.to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.bool()


def nonfinite_tensors(state, name: str = "") -> list[str]:
    """The names (``model.encoder.norm.weight``, ``optimizer.state.3.exp_avg``) of the floating-point tensors in
    ``state`` (nested dicts, lists and tuples) that hold an inf or NaN."""
    if isinstance(state, torch.Tensor):
        return [name] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [found for key, value in items for found in nonfinite_tensors(value, f"{name}.{key}" if name else str(key))]


def refuse_nonfinite(state: dict, what: str) -> None:
    """Raise ``NonFiniteCheckpoint`` naming ``what`` (e.g. "the checkpoint of epoch 4") and the first tensors of
    ``state`` that are not finite, if any is."""
    bad = nonfinite_tensors(state)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteCheckpoint(f"{what} is not saved: {shown} hold non-finite values (inf or NaN), the run "
                                  "diverged; lower optim.lr or set optim.clip_grad, and run again from the last "
                                  "checkpoint")
