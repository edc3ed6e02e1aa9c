"""Fine-tuning one test fold on Ray Train workers: the model, its losses and what each epoch measures.

Each epoch trains on a new permutation of the fold's training clips (``sampling.GlobalBatchSampler``), then
the ranks score the validation clips (one temporal view; each rank its share, gathered) and keep the weights of
the best epoch by the protocol's selection metric. After the last epoch they test with the last and the best
weights (``evaluation.test_files``). ``pipeline.folds`` runs this for every fold of a dataset.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from model import HiCMAEClassifier, load_reference_weights
from preprocessing.manifest import DatasetInfo

from .augment import mixup_cutmix
from .data import ClipDataset, evaluation_loader, training_loader
from .evaluation import clip_outputs, gather_outputs, model_inputs, score, test_files
from .examples import finetune_eval_examples, finetune_train_examples
from .losses import label_smoothing_cross_entropy, soft_target_cross_entropy
from .metrics import selection_metric
from .optim import optimizer_step
from .sampling import GlobalBatchSampler, rank_share
from .settings import FinetuneSettings
from .training import TrainData, TrainingTask, autocast, fit, unwrap


def train_loss(net, batch: dict, info: DatasetInfo, settings: FinetuneSettings, rng: np.random.Generator):
    """Forward + criterion: mixup/cutmix + soft-target CE, or label-smoothed CE, or MSE for regression."""
    video, audio = batch["video"], batch["audio"]
    if info.task == "regression":
        return F.mse_loss(net(*model_inputs(net, batch)).float(), batch["targets"])
    augment = settings.augment
    if augment.mixup:
        video, audio, soft = mixup_cutmix(video, audio, batch["label"], len(info.classes), augment, rng)
        logits = net(*model_inputs(net, {"video": video, "audio": audio}))
        return soft_target_cross_entropy(logits.float(), soft)
    logits = net(*model_inputs(net, batch))
    return label_smoothing_cross_entropy(logits.float(), batch["label"], augment.label_smoothing)


def train_step(net, batch: dict, optimizer, info: DatasetInfo, settings: FinetuneSettings, rng: np.random.Generator,
               precision: str | None = None) -> torch.Tensor:
    """One step on a batch already on the device: ``train_loss``, backward, AdamW step; the detached loss.

    ``precision``: see ``training.autocast``."""
    with autocast(batch["video"].device, precision):
        loss = train_loss(net, batch, info, settings, rng)
    optimizer_step(optimizer, loss, net.parameters(), settings.optim.clip_grad)
    return loss.detach()


class FinetuneTask(TrainingTask):
    """One fold: train on ``split["train"]``, choose the best epoch on ``split["val"]``, test on ``split["test"]``.

    ``config["clips"]`` maps every clip id of the split to its place in the shards (``data.clip_catalog``)."""

    def __init__(self, config: dict):
        self.config = config
        self.settings = FinetuneSettings.model_validate(config["settings"])
        self.info = DatasetInfo.model_validate(config["info"])
        self.split, self.clips = config["split"], config["clips"]
        self.label = config.get("label", self.info.name)
        self.tracker = config.get("tracker")
        self.selection = selection_metric(self.info.task, self.settings.protocol)
        self.best = {"score": -np.inf, "epoch": -1, "model": None}

    def build_model(self, rank: int) -> HiCMAEClassifier:
        settings, info = self.settings, self.info
        outputs = len(info.classes) if info.task == "classification" else len(info.targets)
        model = HiCMAEClassifier(settings.model.build_config(drop_path_rate=settings.drop_path), outputs)
        if self.config.get("init"):
            report = load_reference_weights(model, self.config["init"])
            if rank == 0:
                print(report.summary())
        return model

    def train_data(self):
        settings = self.settings
        examples = partial(finetune_train_examples, window=settings.window, augment=settings.augment,
                           seed=settings.seed)
        dataset = ClipDataset([self.clips[c] for c in self.split["train"]], examples)
        sampler = GlobalBatchSampler(num_clips=len(dataset), batch_size=settings.batch_size, rank=self.rank,
                                     world_size=self.world_size, seed=settings.seed)
        def set_epoch(epoch: int) -> None:  # the epoch's permutation, and its windows and augmentations
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)

        return TrainData(training_loader(dataset, sampler, self.config["loader_workers"]), len(sampler), set_epoch)

    def eval_loader(self, part: str, views: int):
        """This rank's share of the clips of ``split[part]``, ``views`` deterministic windows each."""
        examples = partial(finetune_eval_examples, window=self.settings.window, views=views)
        ids = rank_share(self.split[part], self.rank, self.world_size)
        dataset = ClipDataset([self.clips[c] for c in ids], examples)
        return evaluation_loader(dataset, max(self.settings.batch_size // views, 1), self.config["loader_workers"])

    def train_step(self, net, batch: dict, optimizer, rng: np.random.Generator) -> torch.Tensor:
        return train_step(net, batch, optimizer, self.info, self.settings, rng)

    def evaluate(self, net, device: torch.device, epoch: int) -> dict:
        """Validation scores (the same on every rank); a copy of the weights when the selection metric improves."""
        val = score(gather_outputs(clip_outputs(net, self.eval_loader("val", 1), device, self.info.task)), self.info)
        if val[self.selection] > self.best["score"]:
            weights = {k: v.detach().cpu().clone() for k, v in unwrap(net).state_dict().items()}
            self.best = {"score": val[self.selection], "epoch": epoch, "model": weights}
        return {f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))}

    def state(self) -> dict:
        return {"best": self.best}

    def load_state(self, state: dict) -> None:
        self.best = state.get("best", self.best)

    def final_files(self, net, device: torch.device) -> dict[str, bytes]:
        return test_files(net, self.best, self.eval_loader("test", self.settings.test_views), device, self.info)


def finetune_worker(config: dict) -> None:
    """What every Ray Train worker runs for one fold."""
    fit(FinetuneTask(config))
