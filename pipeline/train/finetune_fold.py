"""Fine-tuning one test fold on Ray Train workers: the model, its losses and what each epoch measures.

Each epoch trains on a new permutation of the fold's training clips (``sampling.GlobalBatchSampler``), then
the ranks score the validation clips (one temporal view; each rank its share, gathered) and keep the weights of
the best epoch by the protocol's selection metric. After the last epoch they test with the last and the best
weights (``evaluation.test_files``). ``pipeline.train.finetune`` runs this for every fold of a dataset.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from model import HiCMAEClassifier, load_reference_weights
from preprocessing.manifest import DatasetInfo

from ..config.training import FinetuneSettings
from ..data.augment.mixing import apply_mix, draw_mix
from ..data.loaders import ClipDataset, training_loader
from ..data.sampling import GlobalBatchSampler
from ..data.windows import finetune_train_examples
from ..metrics import selection_metric
from .compiled import autocast, compiled, unwrap
from .evaluation import (
    clip_outputs,
    eval_forward,
    evaluation_inputs,
    gather_outputs,
    model_inputs,
    score,
    test_files,
)
from .export import init_weights
from .loop import TrainData, TrainingTask, fit
from .losses import label_smoothing_cross_entropy, soft_target_cross_entropy


def mixes(info: DatasetInfo, settings: FinetuneSettings) -> bool:
    """Whether training batches are mixed (Mixup/CutMix: classification with ``augment.mixup``)."""
    return info.task == "classification" and settings.augment.mixup


def mix_inputs(batch: dict, rng: np.random.Generator, info: DatasetInfo, settings: FinetuneSettings,
               device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's Mixup/CutMix weights drawn from ``rng`` on the host, as tensors on ``device`` ({} if not mixing)."""
    if not mixes(info, settings):
        return {}
    video, audio = batch["video"], batch["audio"]
    return draw_mix(rng, settings.augment, video.shape[-2], video.shape[-1], audio.shape[2]).tensors(device)


def finetune_losses(net, batch: dict, info: DatasetInfo, settings: FinetuneSettings,
                    precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + criterion on a batch on the device (with its ``mix_inputs``): Mixup/CutMix + soft-target CE, or
    label-smoothed CE, or MSE for regression -> (the loss, the same as a (1,) float32 tensor). ``precision``: see
    ``training.autocast``."""
    with autocast(batch["video"].device, precision):
        if info.task == "regression":
            loss = F.mse_loss(net(*model_inputs(net, batch)).float(), batch["targets"])
        elif mixes(info, settings):
            augment = settings.augment
            video, audio, soft = apply_mix(batch["video"], batch["audio"], batch["label"], len(info.classes),
                                           augment.label_smoothing, batch)
            logits = net(*model_inputs(net, {"video": video, "audio": audio}))
            loss = soft_target_cross_entropy(logits.float(), soft)
        else:
            logits = net(*model_inputs(net, batch))
            loss = label_smoothing_cross_entropy(logits.float(), batch["label"], settings.augment.label_smoothing)
    return loss, loss.float().reshape(1)


class FinetuneTask(TrainingTask):
    """One fold: train on ``split["train"]``, choose the best epoch on ``split["val"]``, test on ``split["test"]``.

    ``config["clips"]`` maps every clip id of the split to its place in the shards (``data.clip_catalog``)."""

    def __init__(self, config: dict):
        super().__init__(config)
        self.settings = FinetuneSettings.model_validate(config["settings"])
        self.info = DatasetInfo.model_validate(config["info"])
        self.split, self.clips = config["split"], config["clips"]
        self.label = config.get("label", self.info.name)
        self.selection = selection_metric(self.info.task, self.settings.protocol)
        self.best = {"score": -np.inf, "epoch": -1, "model": None}

    def build_model(self, rank: int) -> HiCMAEClassifier:
        settings, info = self.settings, self.info
        outputs = len(info.classes) if info.task == "classification" else len(info.targets)
        model = HiCMAEClassifier(settings.model.build_config(drop_path_rate=settings.drop_path), outputs)
        if self.config.get("init"):
            # a checkpoint's or an exported model's tensors, by name and shape (a pre-training model's decoders
            # have no place here, and a head of other classes keeps its init), as the reference fine-tunes
            report = load_reference_weights(model, init_weights(self.config["init"]), source=self.config["init"])
            if rank == 0:
                self.console.detail(f"{self.label}: {report.counts()}")
                self.console.detail(report.summary(limit=None))
        return model

    def train_data(self, rank: int, world_size: int) -> TrainData:
        settings = self.settings
        examples = partial(finetune_train_examples, window=settings.window, augment=settings.augment,
                           seed=settings.seed)
        dataset = ClipDataset([self.clips[c] for c in self.split["train"]], examples)
        sampler = GlobalBatchSampler(num_clips=len(dataset), batch_size=settings.batch_size, rank=rank,
                                     world_size=world_size, seed=settings.seed)
        def set_epoch(epoch: int) -> None:  # the epoch's permutation, and its windows and augmentations
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)

        return TrainData(training_loader(dataset, sampler, self.config["loader_workers"]), len(sampler), set_epoch)

    def eval_inputs(self, part: str, views: int) -> dict:
        """What ``clip_outputs`` needs to evaluate this rank's share of the clips of ``split[part]``, ``views``
        deterministic windows each: the loader, the evaluation forward (compiled once, in ``compile_mode``) and the
        rows every batch is padded to: ``batch_size`` for validation and test alike, so that one graph serves both."""
        return {**evaluation_inputs(self.split[part], self.clips, self.settings.window, views, self.settings.batch_size,
                                    self.config["loader_workers"], self.rank, self.world_size),
                "forward": self.eval_forward()}

    def eval_forward(self):
        """``evaluation.eval_forward``, compiled in ``compile_mode`` (on first use; one graph for every batch)."""
        if getattr(self, "_eval_forward", None) is None:
            self._eval_forward = compiled(eval_forward, self.compile_mode)
        return self._eval_forward

    def step_inputs(self, batch: dict, rng: np.random.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        return mix_inputs(batch, rng, self.info, self.settings, device)

    def losses(self, net, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return finetune_losses(net, batch, self.info, self.settings, self.precision)

    def evaluate(self, net, device: torch.device, epoch: int) -> dict:
        """Validation scores (the same on every rank); a copy of the weights when the selection metric improves."""
        val = score(gather_outputs(clip_outputs(net, device=device, task=self.info.task,
                                                **self.eval_inputs("val", 1))), self.info)
        if val[self.selection] > self.best["score"]:
            weights = {k: v.detach().cpu().clone() for k, v in unwrap(net).state_dict().items()}
            self.best = {"score": val[self.selection], "epoch": epoch, "model": weights}
        return {f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))}

    def state(self) -> dict:
        return {"best": self.best}

    def load_state(self, state: dict) -> None:
        self.best = state.get("best", self.best)

    def final_files(self, net, device: torch.device) -> dict[str, bytes]:
        return test_files(net, self.best, device=device, info=self.info,
                          **self.eval_inputs("test", self.settings.test_views))


def finetune_worker(config: dict) -> None:
    """What every Ray Train worker runs for one fold."""
    fit(FinetuneTask(config))
