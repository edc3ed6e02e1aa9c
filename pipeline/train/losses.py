"""Classification criteria of fine-tuning: soft-target cross-entropy (after Mixup/CutMix) and label smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k target_k log softmax(logits)_k; logits and soft_targets (B, K)."""
    return torch.sum(-soft_targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def label_smoothing_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                  smoothing: float = 0.1) -> torch.Tensor:
    """Mean over the batch of (1 - s) * NLL(target) + s * mean_k(-log p_k); logits (B, K), targets (B,) int."""
    log_probs = F.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(dim=-1, index=targets.long().unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=-1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()
