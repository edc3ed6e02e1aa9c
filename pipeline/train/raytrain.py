"""Ray Train glue for both training stages: starting a run, the worker's context, checkpoints in and out.

Local by default (Ray on loopback, using this machine's cores); on a cluster when ``RAY_ADDRESS`` is set.
Checkpoints go through ``ray.train.report``; when a worker dies, ``FailureConfig(max_failures)`` restarts the
whole worker group (Ray Train v2, the default in Ray 2.60) and ``training.fit`` resumes from
``ray.train.get_checkpoint()``.

What the workers have to say reaches the console through the stage's ``console.remote_console()``; Ray forwards
their output, and Ray Train logs below warnings, only with ``--verbose`` (``console.verbose``).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from preprocessing.ray_runtime import on_loopback, start_ray

from ..config.params import ScalingSettings
from ..console import remote_console, verbose
from ..layout import CHECKPOINT_STATE

TRACKER = "tracker"  # a run's MLflow logger in its config (``loop.run_options``): rank 0's alone


def run_trainer(loop: Callable[[dict], None], loop_config: dict, scaling: ScalingSettings, name: str,
                storage: str | Path):
    """Run ``loop(loop_config)`` on Ray Train workers; returns the ray.train.Result (raises if training failed).

    Every call is a new Ray Train run (its name gets a time stamp): a worker that dies is replaced and the
    group resumes from the run's last checkpoint, but a later call never picks up a stale run's state.

    ``loop_config`` travels pickled to bytes: Ray Train's controller process unpickles ``train_loop_config`` but
    has no use for it, and its objects would make it import what they need (MLflow, the training modules), which
    delays every run's start by seconds of CPU. The workers unpickle it (``_unpack``), all but rank 0 without the
    ``tracker`` (None for them), which only rank 0 uses and whose unpickling imports MLflow (seconds of CPU).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .rendezvous import LoopbackTorchConfig

    start_ray(log_to_driver=verbose())
    name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    tracker = pickle.dumps(loop_config[TRACKER]) if loop_config.get(TRACKER) is not None else None
    trainer = TorchTrainer(
        partial(_unpack, loop),
        train_loop_config={"pickled": pickle.dumps({**loop_config, TRACKER: None} if tracker else loop_config),
                           TRACKER: tracker},
        torch_config=LoopbackTorchConfig() if on_loopback() else TorchConfig(),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(Path(storage).resolve()),
                             failure_config=FailureConfig(max_failures=scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING")),
    )
    return trainer.fit()


def worker_console():
    """The stage's console for its Ray processes (``console.remote_console``), Ray started first as the stages
    start it (on loopback unless ``RAY_ADDRESS``)."""
    start_ray(log_to_driver=verbose())
    return remote_console()


def _unpack(loop: Callable[[dict], None], config: dict) -> None:
    import ray.train

    loop_config = pickle.loads(config["pickled"])
    if config[TRACKER] is not None and ray.train.get_context().get_world_rank() == 0:
        loop_config[TRACKER] = pickle.loads(config[TRACKER])
    loop(loop_config)


def runs_that_fit(scaling: ScalingSettings, limit: int | None = None) -> int:
    """How many training runs of ``scaling`` the Ray cluster's resources hold at once (at least 1, at most
    ``limit``)."""
    import ray

    start_ray(log_to_driver=verbose())
    available = ray.cluster_resources()
    needs = {"CPU": scaling.num_workers * scaling.cpus_per_worker, "GPU": scaling.num_workers if scaling.use_gpu else 0}
    fits = min(int(available.get(resource, 0) // need) for resource, need in needs.items() if need)
    return max(1, min(fits, limit or fits))


def run_concurrently(driver: Callable[[object], None], items: list, *, limit: int) -> dict[object, str]:
    """``driver(item)`` for every item, at most ``limit`` at a time, each in a Ray task of its own that claims no
    CPU (it only drives a Ray Train run, ``run_trainer``, whose workers claim the resources). A call that fails
    does not stop the others. Returns, by item, the error of every call that failed."""
    import ray

    start_ray(log_to_driver=verbose())
    remote = ray.remote(num_cpus=0, max_retries=0)(_call)  # Ray Train retries its workers itself
    shared = ray.put(driver)  # serialised once for all the calls, not once per call
    queue, running, failed = list(items), {}, {}
    while queue or running:
        while queue and len(running) < limit:
            item = queue.pop(0)
            running[remote.remote(shared, item)] = item
        [done], _ = ray.wait(list(running), num_returns=1)
        item = running.pop(done)
        try:
            ray.get(done)
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if err.cause is not None else err
            failed[item] = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[-1]}"
    return failed


def _call(driver: Callable[[object], None], item: object) -> None:
    driver(item)


def worker_context() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Ray Train worker; a GPU worker's device is made the current one (NCCL's
    object collectives, such as the evaluation's gather, use the current device)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return context.get_world_rank(), context.get_world_size(), device


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model on this worker's device, wrapped in DistributedDataParallel when there are several workers."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def restore_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tracker=None) -> dict | None:
    """Load the run's latest checkpoint into model and optimizer; returns its whole state, or None.

    Given the run's ``tracker``, logs the metric ``resumed_from_epoch`` (the checkpoint's epoch, at that step) into
    the same MLflow run.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_STATE, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if tracker:
        tracker.log_epoch({"resumed_from_epoch": state["epoch"]}, state["epoch"])
    return state


def report_epoch(metrics: dict, state: dict | None, files: dict[str, bytes] | None = None) -> None:
    """Report an epoch's metrics from every rank; rank 0 passes ``state`` (and ``files``) as the checkpoint."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / CHECKPOINT_STATE)
        for name, payload in (files or {}).items():
            (Path(folder) / name).write_bytes(payload)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def load_result_state(result) -> dict:
    """The ``state.pt`` of a finished run's last checkpoint (``result``: what ``run_trainer`` returned)."""
    with result.checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_STATE, map_location="cpu", weights_only=False)
