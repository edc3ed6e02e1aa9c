"""The pre-training stage: HiCMAE self-supervised training on a dataset's shards, on Ray Train.

    hicmae pretrain      (the dataset is params.yaml's ``pretrain.dataset``)

Writes ``runs/pretrain/checkpoint.pt`` (model state dict + config; loadable by ``model.load_reference_weights``),
``metrics.json`` (the last epoch's losses), ``history.csv`` (the losses and lr of every epoch) and ``model/``, the
whole pre-training model exported in the Hub's layout (``export.export_pretrained``), and tracks the run in MLflow,
where the exported model is registered as a version of ``hicmae-pretrain-<dataset>`` (``pipeline.registry``: what
``finetune.init: models:/hicmae-pretrain-<dataset>/<version>`` starts from).
``pretrain.init`` (default 'none') goes on from earlier weights: an exported folder, a Hub repo id or a checkpoint
file, every tensor of the model by name and shape.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from model import HiCMAEPretrain
from preprocessing.fileio import atomic_path, atomic_write_bytes, sha256_file, write_json
from preprocessing.shard_index import ShardIndex

from ..config.params import DataParams
from ..config.training import Params, PretrainSettings, training_params
from ..console import current
from ..data.loaders import ClipStream, shards_hash, stream_loader, verified_shards
from ..data.windows import pretrain_examples
from ..layout import HISTORY_FILE, Layout, require, shown
from . import raytrain
from .compiled import autocast
from .export import export_pretrained, load_strictly, resolve_init
from .loop import TrainData, TrainingTask, fit, results_only, run_options
from .optim import steps_per_epoch
from .preemption import on_signals
from .resume import forget, run_inputs

LOSS_KEYS = ("loss", "loss_video", "loss_audio", "loss_contrastive")


def pretrain_losses(net, batch: dict, precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward with every loss on a batch on the device: (the total loss, the (len(LOSS_KEYS),) float32 losses).
    ``precision``: see ``training.autocast``."""
    with autocast(batch["video"].device, precision):
        out = net(batch["video"], batch["audio"], batch["mask_video"], batch["mask_audio"])
    return out.loss, torch.stack([getattr(out, key).float() for key in LOSS_KEYS])


class PretrainTask(TrainingTask):
    """Masked audio-visual autoencoding with the contrastive loss; a checkpoint every ``scaling.checkpoint_every``
    epochs."""

    loss_names = LOSS_KEYS

    def __init__(self, config: dict):
        super().__init__(config)
        self.settings = PretrainSettings.model_validate(config["settings"])
        self.label = f"pretrain {self.settings.dataset}"

    def build_model(self, rank: int) -> HiCMAEPretrain:
        model = HiCMAEPretrain(self.settings.model.build_config())
        if self.config.get("init"):  # going on from earlier weights (``pretrain.init``): every tensor must fit
            load_strictly(model, self.config["init"])
        return model

    def train_data(self, rank: int, world_size: int) -> TrainData:
        settings = self.settings
        examples = partial(pretrain_examples, window=settings.window, cfg=settings.model.build_config(),
                           seed=settings.seed)
        dataset = ClipStream(self.config["shards"], examples, rank=rank, world_size=world_size,
                             shuffle_buffer=settings.shuffle_buffer, seed=settings.seed)
        loader = stream_loader(dataset, settings.batch_size, self.config["loader_workers"])
        steps = steps_per_epoch(self.config["num_clips"], settings.batch_size, world_size)
        return TrainData(loader, steps, dataset.set_epoch)

    def losses(self, net, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return pretrain_losses(net, batch, self.precision)

    def checkpoint_due(self, epoch: int) -> bool:
        return (epoch + 1) % self.config["checkpoint_every"] == 0


def pretrain_worker(config: dict) -> None:
    """What every Ray Train worker runs."""
    fit(PretrainTask(config))


def pretrain_config(settings: PretrainSettings, shards: list[ShardIndex], options: dict | None = None,
                    init: Path | None = None) -> dict:
    """What the Ray Train workers get (``PretrainTask``): the shards to stream and how many clips they hold, the
    weights file to start from (``export.resolve_init``; None: a fresh model), and how to run
    (``training.run_options``)."""
    return {"settings": settings.model_dump(mode="json"), "label": f"pretrain {settings.dataset}",
            "shards": [shard.path for shard in shards], "init": str(init) if init else None,
            "num_clips": sum(len(shard.samples) for shard in shards), **(options or run_options())}


def run_pretrain(params: Params, layout: Layout, shards: list[ShardIndex], tracker=None,
                 init: Path | None = None) -> dict:
    """Pre-train on ``shards`` (``data.verified_shards``), from the weights file ``init`` when given
    (``export.resolve_init``); writes runs/pretrain/ and returns the last metrics."""
    console = raytrain.worker_console()  # Ray started: its signal handlers are in place, on_signals replaces them
    data_hash, init_hash = shards_hash(shards), sha256_file(init) if init else None
    # the shards are dealt to ranks x loader processes (``sampling.epoch_shards``): their number shapes the batches
    inputs = run_inputs({"shards": data_hash, **({"init": init_hash} if init else {})}, params.pretrain,
                        params.scaling, loader_workers=params.scaling.loader_workers)
    with on_signals(layout.ray_results) as stop:
        options = run_options(params.scaling, params.progress, tracker, console, str(stop.path))
        result = raytrain.run_trainer(pretrain_worker, pretrain_config(params.pretrain, shards, options, init),
                                      params.scaling, name=f"pretrain-{params.pretrain.dataset}",
                                      storage=layout.ray_results, inputs=inputs)
    state = raytrain.load_result_state(result)
    out = layout.pretrain
    with atomic_path(out.checkpoint) as tmp, open(tmp, "wb") as file:  # a file object: no temp name inside
        torch.save({"model": state["model"], "config": state["config"], "epoch": state["epoch"]}, file)
    with result.checkpoint.as_directory() as folder:
        atomic_write_bytes(out.history, (Path(folder) / HISTORY_FILE).read_bytes())
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    write_json(out.metrics, results_only(metrics))
    export_pretrained(state["model"], state["config"], params.pretrain.dataset, results_only(metrics), data_hash,
                      out.model, window=params.pretrain.window, preprocess=params.preprocess,
                      source=f"{params.pretrain.dataset} pre-training, epoch {state['epoch'] + 1}"
                      + (f", going on from the weights sha256 {init_hash}" if init else ""))
    forget(result.path)  # the outputs are written: nothing left to continue
    return metrics


def summary_line(dataset: str, metrics: dict, out) -> str:
    """``pretrain demo: loss 1.32 (video 0.61, audio 0.66, contrastive 0.05) in the last epoch -> runs/pretrain``."""
    parts = ", ".join(f"{key.removeprefix('loss_')} {metrics[f'train/{key}']:.4g}" for key in LOSS_KEYS[1:])
    return (f"pretrain {dataset}: loss {metrics['train/loss']:.4g} ({parts}) in the last epoch -> "
            f"{shown(out.checkpoint)}, {shown(out.metrics)}, {shown(out.model)}/")


def stage_pretrain(params: DataParams) -> dict:
    """``hicmae pretrain``: the run above, tracked as the MLflow run ``pretrain-<dataset>``."""
    import mlflow

    from .. import registry, tracking  # MLflow for the stage alone: the step and the task import without it

    params = training_params(params)
    layout = Layout.current()
    dataset = params.pretrain.dataset
    tracking.require_reachable(tracking.tracking_uri())  # before the shards' hashes: a missing server is said at once
    processed = require(layout.data(dataset).processed, f"run `hicmae preprocess --dataset {dataset}` first")
    shards = verified_shards(processed, f"run `hicmae preprocess --dataset {dataset}` again to redo it")
    data_hash = shards_hash(shards)
    init = resolve_init(params.pretrain.init)
    if init:  # a file that does not fit the model is said here, once, not by every Ray Train worker
        require(init, "set pretrain.init to none, an exported folder, a Hub repo id or a checkpoint file")
        load_strictly(HiCMAEPretrain(params.pretrain.model.build_config()), init)
    inputs = [tracking.shards_input(dataset, processed, shards, data_hash)]
    if init:  # the weights it goes on from
        inputs.append(tracking.file_input(shown(init), init, "init"))
    with tracking.start_stage_run("pretrain", params.pretrain, experiment=params.experiment,
                                  run_name=f"pretrain-{dataset}", data_hash=data_hash, inputs=inputs,
                                  tags={"dataset": dataset, "variant": params.variant}) as run:
        logger = tracking.run_logger(run)
        metrics = run_pretrain(params, layout, shards, tracker=logger, init=init)
        tracking.log_metrics({f"final/{k}": v for k, v in metrics.items()})
        # the digest of fine-tuning's "init" input: which pre-training a fine-tuning run started from
        mlflow.set_tag("checkpoint_sha256", sha256_file(layout.pretrain.checkpoint))
        registry.register_pretrained(dataset, layout.pretrain.model,
                                     {"dataset": dataset, "variant": params.variant, "data_hash": data_hash})
    current().show(summary_line(dataset, metrics, layout.pretrain))
    return metrics
