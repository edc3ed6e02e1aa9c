"""The pre-training stage: HiCMAE self-supervised training on a dataset's shards, on Ray Train.

    hicmae pretrain --processed data/demo/processed --out runs/demo/pretrain

Writes ``<out>/checkpoint.pt`` (model state dict + config; loadable by ``model.load_reference_weights``),
``<out>/metrics.json`` (last epoch's losses) and ``<out>/history.csv`` (the losses and lr of every epoch).
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import torch

from model import HiCMAEPretrain
from preprocessing.manifest import write_json

from . import raytrain
from .config import Params, PretrainSettings
from .data import ClipWindows, make_loader, pretrain_examples, shard_paths
from .optim import build_optimizer, lr_at, optimizer_step, scaled_lrs, set_lr

LOSS_KEYS = ("loss", "loss_video", "loss_audio", "loss_contrastive")


def count_clips(processed_dir: str | Path) -> int:
    """Clips in a preprocessed dataset (from its summary)."""
    summary = json.loads((Path(processed_dir) / "summary.json").read_text())
    return int(summary["ok"])


def train_step(net, batch: dict, optimizer, clip_grad: float | None, precision: str | None = None) -> torch.Tensor:
    """One step on a batch already on the device: forward with every loss, backward, AdamW step.

    Returns the detached (len(LOSS_KEYS),) float32 losses. ``precision``: see ``raytrain.autocast``."""
    with raytrain.autocast(batch["video"].device, precision):
        out = net(batch["video"], batch["audio"], batch["mask_video"], batch["mask_audio"])
    optimizer_step(optimizer, out.loss, net.parameters(), clip_grad)
    return torch.stack([getattr(out, key).detach().float() for key in LOSS_KEYS])


def pretrain_loop(config: dict) -> None:
    """The per-worker training function (runs inside Ray Train)."""
    settings = PretrainSettings.model_validate(config["settings"])
    rank, world, device = raytrain.worker_context()
    raytrain.seed_everything(settings.seed + rank)
    cfg = settings.model.build_config()

    import ray.train.torch

    net = ray.train.torch.prepare_model(HiCMAEPretrain(cfg))
    optimizer = build_optimizer(raytrain.unwrap(net), settings.optim)
    tracker = config.get("tracker") if rank == 0 else None
    restored = raytrain.restore(raytrain.unwrap(net), optimizer, tracker)
    start_epoch = restored["epoch"] + 1 if restored else 0
    history = restored.get("history", []) if restored else []  # per-epoch metrics, kept in the checkpoints

    dataset = ClipWindows(config["shards"], partial(pretrain_examples, window=settings.window, cfg=cfg,
                                                    seed=settings.seed),
                          rank=rank, world_size=world, shuffle_buffer=config["shuffle_buffer"], seed=settings.seed)
    loader = make_loader(dataset, settings.batch_size, config["loader_workers"], drop_last=True)
    steps = max(config["num_clips"] // (settings.batch_size * world), 1)
    peak, floor = scaled_lrs(settings.optim, settings.batch_size * world)
    total, warmup = settings.epochs * steps, int(settings.optim.warmup_epochs * steps)

    for epoch in range(start_epoch, settings.epochs):
        raytrain.seed_epoch(settings.seed, rank, epoch)
        net.train()
        dataset.set_epoch(epoch)
        sums = torch.zeros(len(LOSS_KEYS), device=device)  # summed on the device: no host sync per step
        began = time.perf_counter()
        for step, batch in enumerate(raytrain.batches(loader, steps)):
            set_lr(optimizer, lr_at(epoch * steps + step, total, warmup, peak, floor))
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            sums += train_step(net, batch, optimizer, settings.optim.clip_grad)
        metrics = {f"train/{k}": v / steps for k, v in zip(LOSS_KEYS, sums.tolist(), strict=True)}
        metrics.update({"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                        "samples_per_s": steps * settings.batch_size * world / (time.perf_counter() - began)})
        history.append(metrics)
        if tracker:
            tracker.log_epoch(metrics, epoch)
        last = epoch == settings.epochs - 1
        save = rank == 0 and (last or (epoch + 1) % settings.checkpoint_every == 0)
        state = {"model": raytrain.unwrap(net).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                 "history": history, "config": cfg.to_dict()} if save else None
        raytrain.report(metrics, state)


def run_pretrain(params: Params, processed_dir: str | Path, out_dir: str | Path, tracker=None,
                 loader_workers: int = 1, storage: str | Path | None = None) -> dict:
    """Pre-train on ``processed_dir``'s shards; writes the checkpoint and metrics into ``out_dir``."""
    out_dir = Path(out_dir)
    config = {"settings": params.pretrain.model_dump(mode="json"), "shards": shard_paths(processed_dir),
              "num_clips": count_clips(processed_dir), "loader_workers": loader_workers,
              "shuffle_buffer": 64, "tracker": tracker}
    result = raytrain.run_trainer(pretrain_loop, config, params.scaling, name=f"pretrain-{params.pretrain.dataset}",
                                  storage=storage)
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / raytrain.CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".checkpoint.pt.tmp"
    torch.save({"model": state["model"], "config": state["config"], "epoch": state["epoch"]}, tmp)
    tmp.replace(out_dir / "checkpoint.pt")
    (out_dir / raytrain.HISTORY_FILE).write_bytes(raytrain.history_csv(state.get("history", [])))
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    write_json(out_dir / "metrics.json", metrics)
    return metrics
