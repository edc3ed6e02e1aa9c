"""The pre-training stage: HiCMAE self-supervised training on a dataset's shards, on Ray Train.

    hicmae pretrain      (the dataset is params.yaml's ``pretrain.dataset``)

Writes ``runs/pretrain/checkpoint.pt`` (model state dict + config; loadable by ``model.load_reference_weights``),
``metrics.json`` (the last epoch's losses) and ``history.csv`` (the losses and lr of every epoch), and tracks
the run in MLflow.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from model import HiCMAEPretrain
from preprocessing.fileio import atomic_path, atomic_write_bytes, write_json
from preprocessing.shard_index import ShardIndex

from . import raytrain
from .config import DataParams
from .data import ClipStream, shards_hash, stream_loader, verified_shards
from .examples import pretrain_examples
from .layout import HISTORY_FILE, Layout, require
from .optim import optimizer_step, steps_per_epoch
from .settings import Params, PretrainSettings, training_params
from .training import TrainData, TrainingTask, autocast, fit, results_only

LOSS_KEYS = ("loss", "loss_video", "loss_audio", "loss_contrastive")


def train_step(net, batch: dict, optimizer, clip_grad: float | None, precision: str | None = None) -> torch.Tensor:
    """One step on a batch already on the device: forward with every loss, backward, AdamW step.

    Returns the detached (len(LOSS_KEYS),) float32 losses. ``precision``: see ``training.autocast``."""
    with autocast(batch["video"].device, precision):
        out = net(batch["video"], batch["audio"], batch["mask_video"], batch["mask_audio"])
    optimizer_step(optimizer, out.loss, net.parameters(), clip_grad)
    return torch.stack([getattr(out, key).detach().float() for key in LOSS_KEYS])


class PretrainTask(TrainingTask):
    """Masked audio-visual autoencoding with the contrastive loss; a checkpoint every ``scaling.checkpoint_every``
    epochs."""

    loss_names = LOSS_KEYS

    def __init__(self, config: dict):
        self.config = config
        self.settings = PretrainSettings.model_validate(config["settings"])
        self.tracker = config.get("tracker")
        self.label = f"pretrain {self.settings.dataset}"

    def build_model(self, rank: int) -> HiCMAEPretrain:
        return HiCMAEPretrain(self.settings.model.build_config())

    def train_data(self) -> TrainData:
        settings = self.settings
        examples = partial(pretrain_examples, window=settings.window, cfg=settings.model.build_config(),
                           seed=settings.seed)
        dataset = ClipStream(self.config["shards"], examples, rank=self.rank, world_size=self.world_size,
                             shuffle_buffer=settings.shuffle_buffer, seed=settings.seed)
        loader = stream_loader(dataset, settings.batch_size, self.config["loader_workers"])
        steps = steps_per_epoch(self.config["num_clips"], settings.batch_size, self.world_size)
        return TrainData(loader, steps, dataset.set_epoch)

    def train_step(self, net, batch: dict, optimizer, rng: np.random.Generator) -> torch.Tensor:
        return train_step(net, batch, optimizer, self.settings.optim.clip_grad)

    def checkpoint_due(self, epoch: int) -> bool:
        return (epoch + 1) % self.config["checkpoint_every"] == 0


def pretrain_worker(config: dict) -> None:
    """What every Ray Train worker runs."""
    fit(PretrainTask(config))


def pretrain_config(settings: PretrainSettings, shards: list[ShardIndex], loader_workers: int, tracker=None,
                    checkpoint_every: int = 1) -> dict:
    """What the Ray Train workers get (``PretrainTask``): the shards to stream and how many clips they hold."""
    return {"settings": settings.model_dump(mode="json"), "shards": [shard.path for shard in shards],
            "num_clips": sum(len(shard.samples) for shard in shards), "loader_workers": loader_workers,
            "tracker": tracker, "checkpoint_every": checkpoint_every}


def run_pretrain(params: Params, layout: Layout, shards: list[ShardIndex], tracker=None) -> dict:
    """Pre-train on ``shards`` (``data.verified_shards``); writes runs/pretrain/ and returns the last metrics."""
    config = pretrain_config(params.pretrain, shards, params.scaling.loader_workers, tracker,
                             params.scaling.checkpoint_every)
    result = raytrain.run_trainer(pretrain_worker, config, params.scaling, name=f"pretrain-{params.pretrain.dataset}",
                                  storage=layout.ray_results)
    state = raytrain.load_result_state(result)
    out = layout.pretrain
    with atomic_path(out.checkpoint) as tmp, open(tmp, "wb") as file:  # a file object: no temp name inside
        torch.save({"model": state["model"], "config": state["config"], "epoch": state["epoch"]}, file)
    with result.checkpoint.as_directory() as folder:
        atomic_write_bytes(out.history, (Path(folder) / HISTORY_FILE).read_bytes())
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    write_json(out.metrics, results_only(metrics))
    return metrics


def stage_pretrain(params: DataParams) -> dict:
    """``hicmae pretrain``: the run above, tracked as the MLflow run ``pretrain-<dataset>``."""
    from . import tracking  # MLflow for the stage alone: the step and the task import without it (as finetune's)

    params = training_params(params)
    layout = Layout.current()
    dataset = params.pretrain.dataset
    processed = require(layout.data(dataset).processed, f"run `hicmae preprocess --dataset {dataset}` first")
    shards = verified_shards(processed, f"run `hicmae preprocess --dataset {dataset}` again to redo it")
    with tracking.start_stage_run("pretrain", params.pretrain, experiment=params.experiment,
                                  run_name=f"pretrain-{dataset}", data_hash=shards_hash(shards),
                                  tags={"dataset": dataset, "variant": params.variant}) as run:
        logger = tracking.run_logger(run)
        metrics = run_pretrain(params, layout, shards, tracker=logger)
        tracking.log_metrics({f"final/{k}": v for k, v in metrics.items()})
    return metrics
