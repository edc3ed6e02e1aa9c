"""AdamW parameter groups (weight decay, layer-wise lr decay) and the warm-up + cosine schedule of the reference."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config.training import OptimSettings

NO_DECAY_NAMES = ("mask_token", "mask_token_audio")


def layer_id(name: str, encoder_depth: int, num_layers: int) -> int:
    """Depth id of a parameter for layer-wise lr decay, as the reference assigns it.

    0: patch embeddings and mask tokens; k+1: block k of the video *and* of the audio encoder (they share
    an id); encoder_depth+1+k: fusion layer k; num_layers+1: everything else (norms, fc_norm, head, layer weights).
    """
    if name.startswith(("encoder.patch_embed", "encoder_audio.patch_embed")) or name in NO_DECAY_NAMES:
        return 0
    match = re.match(r"encoder(?:_audio)?\.blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    match = re.match(r"encoder_fusion\.blocks(?:_audio)?\.(\d+)\.", name)
    if match:
        return encoder_depth + 1 + int(match.group(1))
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Groups by (decay or not, layer id), each with an ``lr_scale`` = layer_decay ** (num_layers + 1 - id)."""
    cfg = model.cfg
    encoder_depth = max(cfg.depth, cfg.audio_depth)
    num_layers = encoder_depth + cfg.fusion_depth
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name.endswith(".bias") or name in NO_DECAY_NAMES
        lid = layer_id(name, encoder_depth, num_layers) if layer_decay < 1.0 else num_layers + 1
        group = groups.setdefault((no_decay, lid), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (num_layers + 1 - lid), "names": []})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, settings: OptimSettings, fused: bool | None = None,
                    compiled: bool = False) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; ``fused`` None = the fused kernel when every parameter is on a GPU.

    ``compiled``: for a step that torch.compile captures (``compiled.optimizer_update``): every group's learning
    rate a tensor on the parameters' device (``set_lr`` fills it in place, so the schedule is data, not a new
    graph), the multi-tensor implementation, capturable in CUDA graphs."""
    groups = param_groups(model, settings.weight_decay, settings.layer_decay)
    for group in groups:
        group.pop("names")
    if compiled:
        device = groups[0]["params"][0].device
        for group in groups:
            group["lr"] = torch.tensor(settings.lr * group["lr_scale"], device=device)
        return torch.optim.AdamW(groups, lr=torch.tensor(settings.lr, device=device), betas=settings.betas, eps=1e-8,
                                 foreach=True, capturable=True)
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=1e-8, fused=fused or None)


def scaled_lrs(settings: OptimSettings, total_batch: int) -> tuple[float, float]:
    """(peak lr, min lr) scaled by total batch / 256, as the reference."""
    return settings.lr * total_batch / 256, settings.min_lr * total_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine from ``peak`` to ``floor`` at ``total_steps``."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def tensor_lrs(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Every group's learning rate a tensor on ``device``, as ``build_optimizer(compiled=True)`` makes them (a
    restored checkpoint brings them back on the CPU)."""
    for group in optimizer.param_groups:
        group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32).to(device)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate: ``lr`` times its ``lr_scale``, in place where it is a tensor."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def steps_per_epoch(num_clips: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps in an epoch: whole global batches of ``batch_size`` per rank (drop_last), at least one."""
    return max(num_clips // (batch_size * world_size), 1)


@dataclass(frozen=True)
class LrSchedule:
    """The per-step learning rate of a run: ``lr_at`` with peak and floor scaled by the global batch."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak: float
    floor: float

    @classmethod
    def for_run(cls, settings: OptimSettings, *, epochs: int, steps_per_epoch: int, global_batch: int) -> LrSchedule:
        peak, floor = scaled_lrs(settings, global_batch)
        return cls(steps_per_epoch, epochs * steps_per_epoch, int(settings.warmup_epochs * steps_per_epoch),
                   peak, floor)

    def at(self, epoch: int, step: int) -> float:
        return lr_at(epoch * self.steps_per_epoch + step, self.total_steps, self.warmup_steps, self.peak, self.floor)
