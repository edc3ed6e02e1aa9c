"""Ray Train glue shared by pre-training and fine-tuning: starting Ray, the trainer, checkpoints, the step loop.

Local by default (Ray on loopback, using this machine's cores); on a cluster when ``RAY_ADDRESS`` is set.
Checkpoints go through ``ray.train.report``; when a worker dies, ``FailureConfig(max_failures)`` restarts the
whole worker group (Ray Train v2, the default in Ray 2.60) and the loops resume from ``ray.train.get_checkpoint()``:
model, optimizer, epoch and the loop's own state from the checkpoint, the random draws from ``seed_epoch``.
"""

from __future__ import annotations

import csv
import io
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from preprocessing.ray_runtime import start_ray

from .config import PROJECT_ROOT, ScalingSettings

CHECKPOINT_FILE = "state.pt"
HISTORY_FILE = "history.csv"  # per-epoch metrics, written with the final checkpoint


def run_trainer(loop: Callable[[dict], None], loop_config: dict, scaling: ScalingSettings, name: str,
                storage: str | Path | None = None):
    """Run ``loop`` on Ray Train workers; returns the ray.train.Result (raises if training failed).

    Every call is a new Ray Train run (its name gets a time stamp): a worker that dies is replaced and the
    group resumes from the run's last checkpoint, but a later call never picks up a stale run's state.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start_ray(log_to_driver=True)
    storage = Path(storage or PROJECT_ROOT / "ray_results").resolve()
    name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()


def worker_context() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Ray Train worker."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str | None = None):
    """``precision`` "bf16" (autocast) or "fp32"; None: bf16 on GPU, float32 on CPU (bf16 matmuls are slow on
    most CPUs)."""
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


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


def seed_epoch(seed: int, rank: int, epoch: int) -> np.random.Generator:
    """Seed Python, NumPy and torch for one epoch of one rank; returns a generator for the loop's own draws.

    Every epoch's random draws (dropout, drop path, mixup) derive from (seed, rank, epoch) alone, so a run
    resumed from a checkpoint draws exactly what the uninterrupted run would have, on every rank.
    """
    sequence = np.random.SeedSequence([seed, rank, epoch])
    seed_everything(int(sequence.generate_state(1, np.uint64)[0]))
    return np.random.default_rng(sequence)


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tracker=None) -> dict | None:
    """Load the latest Ray Train checkpoint into model and optimizer; returns its state dict or None.

    After a restart, says so in the log and, given the run's ``tracker``, logs the metric
    ``resumed_from_epoch`` (the checkpoint's epoch, at that step) into the same MLflow run.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    print(f"resumed from the checkpoint of epoch {state['epoch']} (rank {ray.train.get_context().get_world_rank()})")
    if tracker:
        tracker.log_epoch({"resumed_from_epoch": state["epoch"]}, state["epoch"])
    return state


def report(metrics: dict, state: dict | None, extra_files: dict[str, bytes] | None = None) -> None:
    """Report metrics from every rank; rank 0 passes ``state`` (and files) as the checkpoint."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / CHECKPOINT_FILE)
        for name, payload in (extra_files or {}).items():
            (Path(folder) / name).write_bytes(payload)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def history_csv(history: list[dict]) -> bytes:
    """Per-epoch metrics dicts as CSV: one row per epoch, the columns in order of first appearance."""
    columns = list(dict.fromkeys(name for epoch in history for name in epoch))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue().encode()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel, if wrapped."""
    return model.module if hasattr(model, "module") else model
