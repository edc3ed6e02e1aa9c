"""Loading reference (and our own) HiCMAE weights by key name.

Released reference checkpoints are ``torch.save`` dicts ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``
where ``args`` is a pickled ``argparse.Namespace``. They are read with ``weights_only=True`` and only
``argparse.Namespace`` allow-listed, so no arbitrary pickled code runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

STATE_DICT_ENTRIES = ("model", "module", "state_dict")


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)        # model tensors the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)     # checkpoint tensors the model has no use for
    shape_mismatch: list[str] = field(default_factory=list)  # same name, other shape (e.g. another head)

    def summary(self, limit: int | None = 8) -> str:
        """What was loaded, and the names of what was not (at most ``limit`` of each kind; None: all)."""
        def names(keys: list[str]) -> str:
            shown = ", ".join(keys[:limit])
            return shown + (f", ... ({len(keys) - limit} more)" if limit is not None and len(keys) > limit else "")

        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        for label, keys in self.kinds():
            if keys:
                lines.append(f"  {len(keys)} {label}: {names(keys)}")
        return "\n".join(lines)

    def counts(self) -> str:
        """One line, without names: ``162 tensors loaded, 6 missing (kept their init), 176 unexpected (ignored)``."""
        kinds = [f"{len(keys)} {label}" for label, keys in self.kinds() if keys]
        return ", ".join([f"{len(self.loaded)} tensors loaded", *kinds])

    def kinds(self) -> tuple[tuple[str, list[str]], ...]:
        return (("missing (kept their init)", self.missing), ("unexpected (ignored)", self.unexpected),
                ("shape mismatch (kept their init)", self.shape_mismatch))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load without executing pickled code; a wrong or truncated file gets a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"{path}: not a readable PyTorch checkpoint "
                         f"(truncated, corrupt, or holds objects other than tensors): {err}") from err


def extract_state_dict(checkpoint: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: its 'model' (or 'module'/'state_dict') entry, or itself."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source}: expected a dict of tensors, got {type(checkpoint).__name__}")
    for entry in STATE_DICT_ENTRIES:
        if isinstance(checkpoint.get(entry), dict):
            checkpoint = checkpoint[entry]
            break
    state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{source}: holds no tensors (keys: {', '.join(list(checkpoint)[:8])})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def compare_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """What loading ``state`` into ``module`` by name and shape finds: the tensors that fit (``loaded``), the
    module's tensors ``state`` lacks, those it has no place for, and those of another shape."""
    own = module.state_dict()
    report = LoadReport(source=source)
    for key, tensor in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != tensor.shape:
            report.shape_mismatch.append(f"{key} {tuple(tensor.shape)} vs {tuple(own[key].shape)}")
        else:
            report.loaded.append(key)
    report.missing = [key for key in own if key not in state]
    return report


def load_weights_strictly(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Load ``state`` into ``module``, every tensor of both by name and shape; else a ValueError naming ``source``
    and the tensors that are missing, unexpected (e.g. renamed) or of another shape. No layer keeps its init."""
    report = compare_state(module, state, source)
    problems = [f"{len(keys)} {label.split(' (')[0]}: {', '.join(keys[:8])}" + (" ..." if len(keys) > 8 else "")
                for label, keys in report.kinds() if keys]
    if problems:
        raise ValueError(f"{source}: does not fit a {type(module).__name__} of these settings ({'; '.join(problems)})")
    module.load_state_dict(state)
    return report


def load_reference_weights(module: nn.Module, state_dict_or_path: dict | str | os.PathLike,
                           source: str | None = None) -> LoadReport:
    """Copy every tensor whose name and shape match into ``module`` (not strict, as the reference driver).

    Accepts a state dict, a checkpoint dict with a 'model' entry, or a path to either (``source`` names a dict in
    the report). Pre-training checkpoints load into fine-tuning models (decoders and mask tokens are reported as
    unexpected); a head of another class count is reported as a shape mismatch and keeps its init. Raises if
    nothing matches.
    """
    if isinstance(state_dict_or_path, dict):
        source, checkpoint = source or "state dict", state_dict_or_path
    else:
        source, checkpoint = source or str(state_dict_or_path), read_checkpoint(state_dict_or_path)
    state = extract_state_dict(checkpoint, source)

    report = compare_state(module, state, source)
    usable = {key: state[key] for key in report.loaded}
    if not usable:
        raise ValueError(f"{source}: none of its {len(state)} tensors match the model "
                         f"(first keys: {', '.join(list(state)[:5])}); is it a HiCMAE checkpoint?")
    module.load_state_dict(usable, strict=False)
    log.info(report.summary())
    return report


# Reference constructor / command-line argument names -> HiCMAEConfig fields.
_REFERENCE_NAMES = {
    "img_size": "img_size", "patch_size": "patch_size", "tubelet_size": "tubelet_size",
    "num_frames": "num_frames", "all_frames": "num_frames",
    "encoder_embed_dim": "embed_dim", "embed_dim": "embed_dim",
    "encoder_depth": "depth", "depth": "depth",
    "encoder_num_heads": "num_heads", "num_heads": "num_heads",
    "patch_size_audio": "audio_patch_size",
    "encoder_embed_dim_audio": "audio_embed_dim", "embed_dim_audio": "audio_embed_dim",
    "encoder_depth_audio": "audio_depth", "depth_audio": "audio_depth",
    "encoder_num_heads_audio": "audio_num_heads", "num_heads_audio": "audio_num_heads",
    "encoder_fusion_depth": "fusion_depth", "fusion_depth": "fusion_depth",
    "encoder_fusion_num_heads": "fusion_num_heads", "fusion_num_heads": "fusion_num_heads",
    "decoder_embed_dim": "decoder_embed_dim", "decoder_depth": "decoder_depth",
    "decoder_num_heads": "decoder_num_heads",
    "decoder_embed_dim_audio": "audio_decoder_embed_dim", "decoder_depth_audio": "audio_decoder_depth",
    "decoder_num_heads_audio": "audio_decoder_num_heads",
    "mlp_ratio": "mlp_ratio", "norm_eps": "norm_eps", "drop_path_rate": "drop_path_rate",
    "return_intermediate_features": "hierarchy_layers",
    "inter_contrastive_temperature": "contrastive_temperature",
}
# Reference options this implementation supports only at the value every released setting uses.
_REFERENCE_FIXED = {"qkv_bias": True, "qk_scale": None, "init_values": 0.0, "use_learnable_pos_emb": False,
                    "drop_rate": 0.0, "attn_drop_rate": 0.0, "encoder_in_chans": 3, "in_chans": 3,
                    "encoder_in_chans_audio": 1, "in_chans_audio": 1}


def config_overrides_from_reference(reference: dict) -> dict:
    """HiCMAEConfig overrides from a reference config (constructor kwargs or a checkpoint's ``args``).

    Unknown keys are ignored; options set to a value we do not implement raise a ValueError.
    """
    overrides = {}
    for key, value in reference.items():
        if key in _REFERENCE_FIXED and value != _REFERENCE_FIXED[key]:
            raise ValueError(f"reference option {key}={value!r} is not supported "
                             f"(only {_REFERENCE_FIXED[key]!r})")
        if key in _REFERENCE_NAMES and value is not None:
            overrides[_REFERENCE_NAMES[key]] = tuple(value) if isinstance(value, list) else value
    if "img_size_audio" in reference:
        overrides["audio_frames"], overrides["audio_mel_bins"] = reference["img_size_audio"]
    return overrides
