"""``scaling.accum_steps``: W Ray Train workers x A micro-batches train as W x A workers would.

Each case is a real training run of a stage (``raytrain.run_trainer`` with the stage's own worker and config, the
``hicmae_test`` size, CPU, gloo) on the processed demo shards, its per-step losses logged to a real MLflow server
(``progress.log_every_steps: 1``). The same global batch is split three ways: 2 workers x 1 micro-batch against
1 x 2 (global batch 4), and 2 x 2 against 4 x 1 (global batch 8).

Tolerances, from the arithmetic:
- 1 x 2 against 2 x 1 is exact. The micro-batches read the same clips and draw the same random numbers as the two
  ranks (windows, augmentation, Mixup/CutMix, drop path), so their forwards are identical; DDP averages the two
  ranks' gradients as a/2 + b/2, and the accumulated gradient is a/2 + b/2 too (the loss halved: a power of two
  scales every backward op exactly, and addition commutes). The weights are equal bit for bit.
- 2 x 2 against 4 x 1 adds four gradients in another order ((a/4 + b/4) + (c/4 + d/4) on the 2 workers; gloo's ring
  order on the 4): float32 rounding, a relative 1e-7 or so of each gradient. AdamW's update is about
  lr * m / sqrt(v), so the weights differ by a few ulps of the update per step. Measured over these runs' steps:
  3.2e-7 (fine-tuning) and 3e-8 (pre-training) at most, against updates of about 1e-3 a step; ``WEIGHT_ATOL`` is
  2e-6, and the per-step losses agree within ``LOSS_RTOL`` (measured: 1.3e-7 relative; the first step's exactly,
  the weights still the same).
- eager against ``default`` compile with micro-batches: tests/test_compile.py, on the step itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import mlflow
import pytest
import torch

from pipeline.config.params import ProgressSettings, ScalingSettings
from pipeline.config.training import FinetuneSettings, PretrainSettings
from pipeline.data.loaders import clip_catalog, verified_shards
from pipeline.tracking import RunLogger
from pipeline.train import raytrain
from pipeline.train.finetune import fold_config, fold_splits
from pipeline.train.finetune_fold import finetune_worker
from pipeline.train.loop import run_options
from pipeline.train.preemption import Preempted
from pipeline.train.pretrain import pretrain_config, pretrain_worker
from pipeline.train.resume import run_inputs
from preprocessing.manifest import read_manifest

pytestmark = pytest.mark.system

WEIGHT_ATOL, LOSS_RTOL = 2e-6, 1e-5
OPTIM = {"lr": 0.05, "min_lr": 1e-4, "warmup_epochs": 0}  # a learning rate that moves the weights from step 1


class Trained(NamedTuple):
    weights: dict[str, torch.Tensor]
    losses: list[float]  # train_step/loss of every step, as rank 0 logged it


class Demo(NamedTuple):
    shards: list
    info: object
    clips: list


@pytest.fixture(scope="module")
def demo(demo_shards) -> Demo:
    data = demo_shards / "data" / "demo"
    info, clips = read_manifest(data / "manifest.jsonl")
    return Demo(verified_shards(data / "processed", "run the demo's preprocessing again"), info, clips)


@pytest.fixture(scope="module")
def runs(demo, mlflow_server, tmp_path_factory):
    """``runs(stage, workers, accum)``: that run of 2 epochs (``train``), made once for the module's tests."""
    experiment = mlflow.MlflowClient(mlflow_server.url).create_experiment("accumulation")
    folder, made = tmp_path_factory.mktemp("accumulation"), {}

    def run(stage: str, workers: int, accum: int, stop_file: Path | None = None) -> Trained:
        if stop_file is not None:  # a run of its own, in the stop file's folder
            return train(stage, demo, workers, accum, stop_file.parent, mlflow_server, experiment, stop_file)
        if (stage, workers, accum) not in made:
            made[stage, workers, accum] = train(stage, demo, workers, accum, folder, mlflow_server, experiment)
        return made[stage, workers, accum]

    return run


def stage_config(stage: str, demo: Demo, epochs: int, options: dict) -> tuple[object, dict, object]:
    """(the worker, its config, its settings) of ``stage`` on the demo with a per-micro-batch batch of 2."""
    model = {"size": "hicmae_test"}
    if stage == "pretrain":
        settings = PretrainSettings(model=model, batch_size=2, epochs=epochs, shuffle_buffer=4, optim=OPTIM)
        return pretrain_worker, pretrain_config(settings, demo.shards, options), settings
    settings = FinetuneSettings(model=model, init="none", batch_size=2, epochs=epochs, optim=OPTIM,
                                augment={"rand_augment": True, "mixup": True})  # host and loader draws, drop path 0.1
    split = fold_splits(demo.clips, 1, settings)
    config = fold_config(settings, demo.info, 1, split, clip_catalog(demo.shards), None, options)
    return finetune_worker, config, settings


def train(stage: str, demo: Demo, workers: int, accum: int, tmp_path: Path, server, experiment: str,
          stop_file: Path | None = None, epochs: int = 2) -> Trained:
    """A ``workers`` x ``accum`` run of ``stage``: its last weights and its logged step losses. With a
    ``stop_file``, a run of the same inputs continues from where the last one stopped."""
    name = f"{stage}-{workers}x{accum}"
    scaling = ScalingSettings(num_workers=workers, accum_steps=accum, cpus_per_worker=0.5, loader_workers=0,
                              max_failures=0)
    run = mlflow.MlflowClient(server.url).create_run(experiment, run_name=name)
    tracker = RunLogger(server.url, run.info.run_id, str(tmp_path / f"{name}.spill"))
    options = run_options(scaling, ProgressSettings(log_every_steps=1), tracker,
                          stop_file=str(stop_file) if stop_file else None)
    worker, config, settings = stage_config(stage, demo, epochs, options)
    result = raytrain.run_trainer(worker, config, scaling, name=name, storage=tmp_path / "ray_results",
                                  inputs=run_inputs({"case": name}, settings, scaling))
    losses = [point["value"] for point in sorted(server.metric_history({"info": {"run_id": run.info.run_id}},
                                                                        "train_step/loss"), key=lambda p: p["step"])]
    return Trained(raytrain.load_result_state(result)["model"], losses)


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name].float() - b[name].float()).abs().max()) for name in a)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_micro_batches_train_as_that_many_workers(stage, runs):
    two_workers, two_micro = runs(stage, 2, 1), runs(stage, 1, 2)
    assert len(two_workers.losses) >= 4 and two_micro.losses == two_workers.losses  # rank 0's, step by step
    assert largest_difference(two_micro.weights, two_workers.weights) == 0.0  # bit for bit

    four_workers, two_by_two = runs(stage, 4, 1), runs(stage, 2, 2)
    assert len(four_workers.losses) >= 2 and two_by_two.losses[0] == four_workers.losses[0]
    assert two_by_two.losses == pytest.approx(four_workers.losses, rel=LOSS_RTOL)
    assert largest_difference(two_by_two.weights, four_workers.weights) <= WEIGHT_ATOL
    assert largest_difference(two_by_two.weights, two_workers.weights) > 100 * WEIGHT_ATOL  # another global batch


def test_a_run_with_micro_batches_stopped_within_an_epoch_resumes_exactly(runs, tmp_path):
    """1 worker x 2 micro-batches of fine-tuning (Mixup/CutMix drawn on the host, drop path, augmentation: each
    micro-batch its own random states) stopped after its first step and run again: the weights of 2 x 1 never
    stopped, bit for bit."""
    stop = tmp_path / "stop"
    stop.touch()  # asked before the first step: the run stops after it, its checkpoint saved
    with pytest.raises(Preempted, match="step 1 of"):
        runs("finetune", 1, 2, stop_file=stop)
    stop.unlink()
    resumed = runs("finetune", 1, 2, stop_file=stop)
    assert largest_difference(resumed.weights, runs("finetune", 2, 1).weights) == 0.0
