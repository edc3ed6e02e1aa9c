"""Dataset adapters: one module per dataset, each turning the dataset's own folder into a manifest.

Every adapter module exposes the same small interface:

- ``NAME``: the registry name (``crema-d``, ``mafw``, ...);
- its docstring: where to get the dataset, the expected folder layout (the block after
  ``Expected layout::``) and every assumption the adapter makes;
- ``build_manifest(root: Path) -> tuple[DatasetInfo, list[ClipRecord]]``: checks the whole folder first
  (a folder that is not as expected raises one ``DatasetLayoutError``), then returns the clips sorted by
  clip id with labels, speaker and the paper protocol's test fold. An adapter with options (``custom``: your
  own clip list) takes them as keyword arguments, from ``conf/datasets/<name>.yaml``.

    python -m preprocessing.datasets <name> <root> <out.jsonl>     # write a manifest
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from preprocessing.datasets._layout import DatasetLayoutError
from preprocessing.manifest import ClipRecord, DatasetInfo

ADAPTERS = {
    "crema-d": "crema_d",
    "mafw": "mafw",
    "dfew": "dfew",
    "mer2023": "mer2023",
    "msp-improv": "msp_improv",
    "ravdess": "ravdess",
    "iemocap": "iemocap",
    "werewolf-xl": "werewolf_xl",
    "avcaffe": "avcaffe",
    "voxceleb2": "voxceleb2",
    "demo": "demo",
    "custom": "custom",
}

__all__ = ["ADAPTERS", "DatasetLayoutError", "adapter", "build_manifest"]


def adapter(name: str) -> ModuleType:
    """The adapter module registered under ``name``."""
    if name not in ADAPTERS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(ADAPTERS)}")
    return importlib.import_module(f"{__name__}.{ADAPTERS[name]}")


def build_manifest(name: str, root: str | Path, **options) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Run the adapter registered under ``name`` on the dataset folder ``root``, with its ``options``."""
    return adapter(name).build_manifest(Path(root), **options)
