"""HiCMAE: Hierarchical Contrastive Masked Autoencoder for audio-visual emotion recognition.

    from model import create_pretrain_model, create_finetune_model, load_reference_weights
    net = create_finetune_model("hicmae_base", num_classes=6)
    print(load_reference_weights(net, "checkpoint-99.pth").summary())
    logits = net(video, audio)        # video (B, 3, 16, 160, 160), audio (B, 1, 256, 128)
"""

from .checkpoint import (
    LoadReport,
    config_overrides_from_reference,
    load_reference_weights,
    load_weights_strictly,
    read_checkpoint,
)
from .config import ARCHITECTURE_FIELDS, SIZES, HiCMAEConfig, get_config
from .finetune import FinetuneFeatures, HiCMAEClassifier
from .masking import random_mask, tube_mask
from .pretrain import HiCMAEPretrain, PretrainOutput


def create_pretrain_model(name: str = "hicmae_base", **overrides) -> HiCMAEPretrain:
    """A pre-training model of a registered size; keyword overrides reach every HiCMAEConfig field."""
    return HiCMAEPretrain(get_config(name, **overrides))


def create_finetune_model(name: str = "hicmae_base", num_classes: int = 6, **overrides) -> HiCMAEClassifier:
    """A fine-tuning model (fine-tuning defaults: drop path 0.1) with ``num_classes`` outputs."""
    overrides.setdefault("drop_path_rate", 0.1)
    return HiCMAEClassifier(get_config(name, **overrides), num_classes)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "HiCMAEConfig", "SIZES", "ARCHITECTURE_FIELDS", "get_config", "HiCMAEPretrain", "PretrainOutput",
    "HiCMAEClassifier",
    "FinetuneFeatures", "create_pretrain_model", "create_finetune_model", "load_reference_weights",
    "load_weights_strictly", "read_checkpoint", "LoadReport", "config_overrides_from_reference", "tube_mask",
    "random_mask", "count_parameters",
]
