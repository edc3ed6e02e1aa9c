"""The fine-tuning stage: one Ray Train run per test fold, evaluated on the held-out fold.

Clean protocol (default): the best epoch is chosen on a speaker-disjoint validation split carved from the
training folds; the test fold is evaluated once, with both the last-epoch and the best-epoch weights.
``protocol: reference`` selects on the test fold itself, as the reference code does.
"""

from __future__ import annotations

import csv
import io
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import HiCMAEClassifier, load_reference_weights
from preprocessing.manifest import ClipRecord, DatasetInfo, read_manifest, split_for_fold

from . import raytrain
from .augment import mixup_cutmix
from .config import FinetuneSettings, Params
from .data import ClipWindows, finetune_eval_examples, finetune_train_examples, make_loader, shard_paths
from .export import export_checkpoint
from .losses import label_smoothing_cross_entropy, soft_target_cross_entropy
from .metrics import aggregate_folds, classification_metrics, regression_metrics, selection_metric
from .optim import build_optimizer, lr_at, optimizer_step, scaled_lrs, set_lr


def fold_splits(clips: list[ClipRecord], fold: int, settings: FinetuneSettings) -> dict[str, list[str]]:
    """Clip ids of train / val / test for one test fold under the configured protocol."""
    if settings.protocol == "reference":
        split = split_for_fold(clips, fold, val_fraction=0.0)
        split["val"] = split["test"]  # the reference picks its best epoch on the test fold
    else:
        split = split_for_fold(clips, fold, settings.val_fraction, seed=settings.seed)
    return {name: [clip.clip_id for clip in rows] for name, rows in split.items()}


def model_inputs(net: torch.nn.Module, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    modalities = raytrain.unwrap(net).modalities
    return (batch["video"] if "video" in modalities else None, batch["audio"] if "audio" in modalities else None)


@torch.no_grad()
def predict(net: torch.nn.Module, loader, device: torch.device, task: str,
            embeddings: bool = False) -> dict[str, np.ndarray]:
    """Per-clip outputs averaged over views: softmax probabilities (classification) or raw outputs.

    With ``embeddings``, also the clip embeddings of the same forward pass, averaged over views, under
    ``embedding/<name>``: ``video`` and ``audio`` (each modality's hierarchical clip embedding) and ``fused``
    (the head's input).
    """
    net.eval()
    model = raytrain.unwrap(net)  # rank 0 evaluates alone: no DDP collectives
    sums: dict[str, dict[str, np.ndarray]] = {}
    counts: dict[str, int] = {}
    truth: dict[str, object] = {}
    for batch in loader:
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with raytrain.autocast(device):
            features = model.forward_features(*model_inputs(net, tensors))
            out = model.head_output(features).float()
        values = {"output": out.softmax(-1) if task == "classification" else out}
        if embeddings:
            values.update({f"embedding/{m}": e for m, e in features.weighted.items()})
            values["embedding/fused"] = features.embedding
        values = {name: v.float().cpu().numpy() for name, v in values.items()}  # name -> (B, ...)
        for i, clip_id in enumerate(batch["clip_id"]):
            clip = sums.setdefault(clip_id, dict.fromkeys(values, 0))
            for name, value in values.items():
                clip[name] = clip[name] + value[i]
            counts[clip_id] = counts.get(clip_id, 0) + 1
            truth[clip_id] = batch["label"][i].item() if task == "classification" else batch["targets"][i].numpy()
    if not sums:
        raise ValueError("the evaluation loader produced no clip")
    ids = sorted(sums)
    result = {"clip_id": np.array(ids), "truth": np.array([truth[c] for c in ids])}
    for name in sums[ids[0]]:
        result[name] = np.stack([sums[c][name] / counts[c] for c in ids])
    return result


def embeddings_npz(predictions: dict) -> bytes:
    """The clip embeddings of ``predict(..., embeddings=True)`` as an .npz: ``clip_id``, ``truth`` (labels or
    targets) and one (N, C) float32 array per embedding (``video``, ``audio``, ``fused``)."""
    arrays = {name.removeprefix("embedding/"): value.astype(np.float32) for name, value in predictions.items()
              if name.startswith("embedding/")}
    buffer = io.BytesIO()
    np.savez(buffer, clip_id=predictions["clip_id"], truth=predictions["truth"], **arrays)
    return buffer.getvalue()


def score(predictions: dict, info: DatasetInfo) -> dict:
    if info.task == "classification":
        return classification_metrics(predictions["truth"], predictions["output"], info.classes)
    return regression_metrics(predictions["truth"], predictions["output"], info.targets)


def predictions_csv(predictions: dict, info: DatasetInfo) -> bytes:
    """One row per clip: id, truth, prediction, and the per-class probabilities (or per-target outputs)."""
    names = info.classes if info.task == "classification" else info.targets
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["clip_id", "truth", "prediction", *names])
    for clip_id, truth, output in zip(predictions["clip_id"], predictions["truth"], predictions["output"],
                                      strict=True):
        if info.task == "classification":
            writer.writerow([clip_id, int(truth), names[int(np.argmax(output))], *np.round(output, 6)])
        else:
            writer.writerow([clip_id, " ".join(f"{t:g}" for t in truth), " ".join(f"{o:.6g}" for o in output),
                             *np.round(output, 6)])
    return buffer.getvalue().encode()


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

    ``precision``: see ``raytrain.autocast``."""
    with raytrain.autocast(batch["video"].device, precision):
        loss = train_loss(net, batch, info, settings, rng)
    optimizer_step(optimizer, loss, net.parameters(), settings.optim.clip_grad)
    return loss.detach()


def finetune_loop(config: dict) -> None:
    """The per-worker training function of one fold (runs inside Ray Train)."""
    settings = FinetuneSettings.model_validate(config["settings"])
    info = DatasetInfo.model_validate(config["info"])
    rank, world, device = raytrain.worker_context()
    raytrain.seed_everything(settings.seed + rank)
    cfg = settings.model.build_config(drop_path_rate=settings.drop_path)
    outputs = len(info.classes) if info.task == "classification" else len(info.targets)
    model = HiCMAEClassifier(cfg, outputs)
    if config.get("init"):
        report = load_reference_weights(model, config["init"])
        if rank == 0:
            print(report.summary())

    import ray.train.torch

    net = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(raytrain.unwrap(net), settings.optim)
    tracker = config.get("tracker") if rank == 0 else None
    restored = raytrain.restore(raytrain.unwrap(net), optimizer, tracker)
    start_epoch = restored["epoch"] + 1 if restored else 0
    best = restored["best"] if restored else {"score": -np.inf, "epoch": -1, "model": None}
    history = restored.get("history", []) if restored else []  # rank 0's per-epoch metrics

    split, window = config["split"], settings.window
    train_set = ClipWindows(config["shards"], partial(finetune_train_examples, window=window,
                                                      augment=settings.augment, seed=settings.seed),
                            clip_ids=set(split["train"]), rank=rank, world_size=world, shuffle_buffer=64,
                            seed=settings.seed)
    train_loader = make_loader(train_set, settings.batch_size, config["loader_workers"], drop_last=True)

    def eval_loader(ids: list[str], views: int):
        examples = partial(finetune_eval_examples, window=window, views=views)
        return make_loader(ClipWindows(config["shards"], examples, clip_ids=set(ids)), settings.batch_size,
                           config["loader_workers"])

    steps = max(len(split["train"]) // (settings.batch_size * world), 1)
    peak, floor = scaled_lrs(settings.optim, settings.batch_size * world)
    total, warmup = settings.epochs * steps, int(settings.optim.warmup_epochs * steps)
    selection = selection_metric(info.task, settings.protocol)

    for epoch in range(start_epoch, settings.epochs):
        rng = raytrain.seed_epoch(settings.seed, rank, epoch)
        net.train()
        train_set.set_epoch(epoch)
        began, loss_sum = time.perf_counter(), torch.zeros((), device=device)  # no host sync per step
        for step, batch in enumerate(raytrain.batches(train_loader, steps)):
            set_lr(optimizer, lr_at(epoch * steps + step, total, warmup, peak, floor))
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss_sum += train_step(net, batch, optimizer, info, settings, rng)
        metrics = {"epoch": epoch, "train/loss": loss_sum.item() / steps, "lr": optimizer.param_groups[0]["lr"],
                   "samples_per_s": steps * settings.batch_size * world / (time.perf_counter() - began)}
        state, files = None, None
        if rank == 0:
            val = score(predict(net, eval_loader(split["val"], 1), device, info.task), info)
            metrics.update({f"val/{k}": v for k, v in val.items() if isinstance(v, (int, float))})
            history.append(metrics)
            if val[selection] > best["score"]:
                weights = {k: v.detach().cpu().clone() for k, v in raytrain.unwrap(net).state_dict().items()}
                best = {"score": val[selection], "epoch": epoch, "model": weights}
            last = epoch == settings.epochs - 1
            if last:
                files = test_files(net, best, eval_loader(split["test"], settings.test_views), device, info)
                files[raytrain.HISTORY_FILE] = raytrain.history_csv(history)
            if tracker:
                tracker.log_epoch(metrics, epoch)
            state = {"model": raytrain.unwrap(net).state_dict(), "optimizer": optimizer.state_dict(),
                     "epoch": epoch, "best": best, "history": history, "config": cfg.to_dict()}
        raytrain.report(metrics, state, files)


def test_files(net, best: dict, loader, device: torch.device, info: DatasetInfo) -> dict[str, bytes]:
    """Evaluate the test fold with the last and the best weights: predictions CSVs, a metrics JSON and the
    best weights' clip embeddings."""
    files, results = {}, {}
    last_weights = {k: v.detach().clone() for k, v in raytrain.unwrap(net).state_dict().items()}
    for name, weights in (("last", last_weights), ("best", best["model"])):
        raytrain.unwrap(net).load_state_dict(weights)
        predictions = predict(net, loader, device, info.task, embeddings=name == "best")
        results[name] = score(predictions, info)
        files[f"predictions_{name}.csv"] = predictions_csv(predictions, info)
    files["embeddings_best.npz"] = embeddings_npz(predictions)
    raytrain.unwrap(net).load_state_dict(last_weights)
    results["best_epoch"] = best["epoch"]
    files["test_metrics.json"] = json.dumps(results, indent=2, default=float).encode()
    return files


def run_finetune(params: Params, settings: FinetuneSettings, manifest: str | Path, processed_dir: str | Path,
                 out_dir: str | Path, init: str | None, tracker_for_fold=None, loader_workers: int = 1,
                 storage: str | Path | None = None, data_hash: str | None = None) -> dict:
    """Fine-tune every configured fold; writes ``<out>/fold-k/`` files and the fold's best model exported to
    ``<out>/fold-k/model/`` (``pipeline.export``), its card recording ``data_hash`` (``tracking.hash_directory`` of
    the shards); returns the fold mean/std summary."""
    info, clips = read_manifest(manifest)
    out_dir = Path(out_dir)
    folds = settings.folds or list(range(1, info.num_folds + 1))
    per_fold = {}
    for fold in folds:
        config = {"settings": settings.model_dump(mode="json"), "info": info.model_dump(mode="json"),
                  "shards": shard_paths(processed_dir), "split": fold_splits(clips, fold, settings),
                  "init": init, "loader_workers": loader_workers,
                  "tracker": tracker_for_fold(fold) if tracker_for_fold else None}
        result = raytrain.run_trainer(finetune_loop, config, params.scaling, name=f"finetune-{info.name}-fold{fold}",
                                      storage=storage)
        fold_dir = out_dir / f"fold-{fold}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        with result.checkpoint.as_directory() as folder:
            for name in ("predictions_last.csv", "predictions_best.csv", "test_metrics.json", "embeddings_best.npz",
                         raytrain.HISTORY_FILE):
                (fold_dir / name).write_bytes((Path(folder) / name).read_bytes())
            export_checkpoint(folder, info, fold_dir / "model", data_hash=data_hash, name=f"{info.name}-fold{fold}",
                              window=settings.window, preprocess=params.preprocess)
        per_fold[fold] = json.loads((fold_dir / "test_metrics.json").read_text())
    summary = {"folds": folds,
               "last": aggregate_folds([per_fold[f]["last"] for f in folds]),
               "best": aggregate_folds([per_fold[f]["best"] for f in folds])}
    return summary
