"""Masks for pre-training and index gathers that keep every shape static.

A mask is a bool tensor (B, N), True = masked, with the same number of masked tokens in every sample.
The model turns it into token indices with a stable sort (visible tokens first, each group in ascending
token order, as the reference's boolean indexing produces) and gathers; no data-dependent shapes.
"""

from __future__ import annotations

import torch


def tube_mask(batch: int, grid: tuple[int, int, int], ratio: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Video tube masking (B, T'*H'*W'): the same int(ratio*H'W') spatial positions in every time slice."""
    frames, height, width = grid
    spatial = height * width
    num_masked = int(ratio * spatial)
    order = torch.rand(batch, spatial, generator=generator).argsort(dim=1)
    spatial_mask = torch.zeros(batch, spatial, dtype=torch.bool)
    spatial_mask.scatter_(1, order[:, :num_masked], True)                 # (B, H'W')
    return spatial_mask.repeat(1, frames)                                 # (B, T'H'W'), t-major order


def random_mask(batch: int, num_tokens: int, ratio: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Audio random patch masking (B, N): int(ratio*N) masked tokens chosen uniformly per sample."""
    num_masked = int(ratio * num_tokens)
    order = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, num_tokens, dtype=torch.bool)
    mask.scatter_(1, order[:, :num_masked], True)
    return mask


def mask_to_ids(mask: torch.Tensor, num_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) bool mask -> (ids_visible (B, N - num_masked), ids_masked (B, num_masked)), each ascending."""
    # A free check on a CPU; on an accelerator it would cost a sync per step, and in a compiled graph a graph break.
    if mask.device.type == "cpu" and not torch.compiler.is_compiling():
        counts = mask.sum(dim=1)
        if not bool((counts == num_masked).all()):
            raise ValueError(f"every sample must have {num_masked} masked tokens, got {counts.tolist()}")
    ids = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    num_visible = mask.shape[1] - num_masked
    return ids[:, :num_visible], ids[:, num_visible:]


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), ids (B, M) -> (B, M, C)"""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
