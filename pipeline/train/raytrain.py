"""Ray Train glue for both training stages: starting a run, the worker's context, checkpoints in and out.

Local by default (Ray on loopback, using this machine's cores); on a cluster when ``RAY_ADDRESS`` is set.
Checkpoints go through ``ray.train.report``; when a worker dies, ``FailureConfig(max_failures)`` restarts the
whole worker group (Ray Train v2, the default in Ray 2.60) and ``loop.fit`` resumes from
``ray.train.get_checkpoint()``. A run's folder is named after its inputs (``resume``), so that the stage run
again after an interruption continues it.

What the workers have to say reaches the console through the stage's ``console.remote_console()``; Ray forwards
their output, and Ray Train logs below warnings, only with ``--verbose`` (``console.verbose``).
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from preprocessing.errors import InputError
from preprocessing.ray_runtime import on_loopback, start_ray

from ..config.params import ScalingSettings
from ..console import Console, remote_console, verbose
from ..layout import CHECKPOINT_STATE, shown
from .preemption import Preempted, StopFile, stop_reason
from .resume import RunInputs, run_folder

TRACKER = "tracker"  # a run's MLflow logger in its config (``loop.run_options``): rank 0's alone
STOP_FILE = "stop_file"  # where a run's config says its stage asks it to stop (``preemption.StopFile``)
STOPPED_AT_STEP = "stopped_at_step"  # in the metrics of a checkpoint saved on a stop request
RANK_STATE = "rank-{rank}.pt"  # a rank's random states, in a checkpoint saved within an epoch


def run_trainer(loop: Callable[[dict], None], loop_config: dict, scaling: ScalingSettings, name: str,
                storage: str | Path, inputs: RunInputs):
    """Run ``loop(loop_config)`` on Ray Train workers; returns the ray.train.Result (raises if training failed, and
    ``Preempted`` if it stopped on request, its checkpoint saved).

    The run's folder is ``<storage>/<name>/<key of inputs>`` (``resume.run_folder``): called again with the same
    inputs after an interruption, Ray Train restores its last checkpoint; with other inputs it starts afresh. The
    console says which. Within a call, a worker that dies is replaced and the group resumes from the last
    checkpoint (``scaling.max_failures`` times). The caller ``resume.forget``s ``result.path`` once it wrote the
    outputs.

    ``loop_config`` travels pickled to bytes: Ray Train's controller process unpickles ``train_loop_config`` but
    has no use for it, and its objects would make it import what they need (MLflow, the training modules), which
    delays every run's start by seconds of CPU. The workers unpickle it (``_unpack``), all but rank 0 without the
    ``tracker`` (None for them), which only rank 0 uses and whose unpickling imports MLflow (seconds of CPU).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from .rendezvous import LoopbackTorchConfig

    start_ray(log_to_driver=verbose())
    folder, said = run_folder(storage, name, inputs)
    label = loop_config.get("label") or name
    if said:
        (loop_config.get("console") or Console()).show(f"{label}: {said}")
    tracker = pickle.dumps(loop_config[TRACKER]) if loop_config.get(TRACKER) is not None else None
    trainer = TorchTrainer(
        partial(_unpack, loop),
        train_loop_config={"pickled": pickle.dumps({**loop_config, TRACKER: None} if tracker else loop_config),
                           TRACKER: tracker},
        torch_config=LoopbackTorchConfig() if on_loopback() else TorchConfig(),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker},
                                     placement_strategy=scaling.placement_strategy),
        run_config=RunConfig(name=folder.name, storage_path=str(folder.parent),
                             failure_config=FailureConfig(max_failures=scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING")),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as err:  # a worker's error the user fixes (diverged, disk full): its one line
        failures = getattr(err, "worker_failures", None) or {}
        cause = next((error for _, error in sorted(failures.items()) if isinstance(error, InputError)), None)
        if cause is None:
            raise
        raise cause from None
    stopped = result.metrics.get(STOPPED_AT_STEP)
    if stopped is not None:
        epoch = result.metrics["epoch"]
        raise Preempted(f"{label}: stopped on request ({stop_reason(loop_config.get(STOP_FILE))}) at epoch "
                        f"{epoch + 1}, step {stopped} of {result.metrics['steps_per_epoch']}, its checkpoint saved "
                        f"in {shown(folder)}: run the same command (or `dvc repro`) to continue from there")
    return result


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
    try:
        loop(loop_config)
    finally:  # rank 0: its queued metrics reach MLflow (or a file beside the log) before Ray ends this process
        if loop_config.get(TRACKER) is not None:
            loop_config[TRACKER].flush()


def runs_that_fit(scaling: ScalingSettings, limit: int | None = None) -> int:
    """How many training runs of ``scaling`` the Ray cluster's resources hold at once (at least 1, at most
    ``limit``)."""
    import ray

    start_ray(log_to_driver=verbose())
    available = ray.cluster_resources()
    needs = {"CPU": scaling.num_workers * scaling.cpus_per_worker, "GPU": scaling.num_workers if scaling.use_gpu else 0}
    fits = min(int(available.get(resource, 0) // need) for resource, need in needs.items() if need)
    return max(1, min(fits, limit or fits))


def run_concurrently(driver: Callable[[object], object], items: list, *, limit: int,
                     stop: StopFile | None = None) -> tuple[dict, dict[object, str]]:
    """``driver(item)`` for every item, at most ``limit`` at a time, each in a Ray task of its own that claims no
    CPU (it only drives a Ray Train run, ``run_trainer``, whose workers claim the resources). A call that fails
    does not stop the others; once ``stop`` is requested no new call starts. Returns, by item, what each call that
    finished returned, and the error of each that failed."""
    import ray

    start_ray(log_to_driver=verbose())
    remote = ray.remote(num_cpus=0, max_retries=0)(_call)  # Ray Train retries its workers itself
    shared = ray.put(driver)  # serialised once for all the calls, not once per call
    queue, running, returned, failed = list(items), {}, {}, {}
    while queue or running:
        while queue and len(running) < limit and not (stop and stop.requested):
            item = queue.pop(0)
            running[remote.remote(shared, item)] = item
        if not running:
            break
        [done], _ = ray.wait(list(running), num_returns=1)
        item = running.pop(done)
        try:
            returned[item] = ray.get(done)
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if err.cause is not None else err
            failed[item] = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[-1]}"
    return returned, failed


def _call(driver: Callable[[object], object], item: object) -> object:
    return driver(item)


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


def restore_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
                       tracker=None) -> dict | None:
    """Load the run's latest checkpoint into model and optimizer; returns its whole state, or None. A checkpoint
    saved within an epoch holds every rank's random states: this rank's are the state's ``rank_state``.

    Given the run's ``tracker``, logs the metric ``resumed_from_epoch`` (the checkpoint's epoch, at that step) into
    the same MLflow run, or ``resumed_within_epoch`` and ``resumed_after_step`` for a checkpoint within an epoch.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_STATE, map_location="cpu", weights_only=False)
        rank_file = Path(folder) / RANK_STATE.format(rank=rank)
        if rank_file.is_file():
            state["rank_state"] = torch.load(rank_file, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    within = state.get("within")  # saved within an epoch, on a stop request
    if tracker and within:
        tracker.log_epoch({"resumed_within_epoch": within["epoch"], "resumed_after_step": within["steps"]},
                          within["epoch"])
    elif tracker:
        tracker.log_epoch({"resumed_from_epoch": state["epoch"]}, state["epoch"])
    return state


def report_epoch(metrics: dict, state: dict | None, files: dict[str, bytes] | None = None,
                 rank_state: list[dict] | None = None, name: str | None = None) -> None:
    """Report metrics from every rank (every rank calls it as often). Rank 0's ``state`` (and result ``files``)
    make the checkpoint; a checkpoint within an epoch adds every rank's ``rank_state`` (its random states), which
    Ray Train merges into the same folder, ``name`` (the same on every rank).

    A ``state`` with a tensor that is not finite is refused (``divergence.NonFiniteCheckpoint``). A checkpoint that
    finds no space is ``fileio.DiskFull``, one line naming where: the temporary folder it is written to first, or
    the run's storage folder that Ray Train copies it to; the run's earlier checkpoints are as they were."""
    import ray.train

    from preprocessing.fileio import DiskFull, out_of_space

    from .divergence import refuse_nonfinite

    if state is None and rank_state is None:
        ray.train.report(metrics)
        return
    what = f"the checkpoint of epoch {metrics['epoch'] + 1}" if "epoch" in metrics else "the checkpoint"
    kept = f"{what} is not saved, and the run's earlier checkpoints are as they were"
    if state is not None:
        refuse_nonfinite(state, what)
    with tempfile.TemporaryDirectory() as folder:
        try:
            if state is not None:
                torch.save(state, Path(folder) / CHECKPOINT_STATE)
            if rank_state is not None:
                torch.save(rank_state, Path(folder) / RANK_STATE.format(rank=ray.train.get_context().get_world_rank()))
            for file, payload in (files or {}).items():
                (Path(folder) / file).write_bytes(payload)
        except Exception as err:
            if out_of_space(err, folder):
                raise DiskFull(folder, kept) from err
            raise
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=name)
        except Exception as err:
            storage = ray.train.get_context().get_storage().experiment_fs_path
            if out_of_space(err, storage):
                raise DiskFull(storage, kept) from err
            raise


def load_result_state(result) -> dict:
    """The ``state.pt`` of a finished run's last checkpoint (``result``: what ``run_trainer`` returned)."""
    with result.checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_STATE, map_location="cpu", weights_only=False)
