"""Which Ray Train run a training stage continues: the interrupted one with the same inputs, or none.

A training run's folder (its checkpoints, under ``ray_results/<name>/``) is named after the inputs that decide its
result (``RunInputs``): the data (the shards' hash, the start checkpoint's, the split), the params that change the
result (the stage's section, the global batch, the device and kernels) and the code (every project module the
stage has loaded). A stage run again with the same inputs (after SIGTERM, a lost node, a crash) finds the folder,
and Ray Train restores its last checkpoint (``loop.fit`` goes on from there, to the weights of a run never
interrupted); with anything changed it gets a new folder and starts afresh, saying what changed. The stage removes
a run's folder once its outputs are written (``forget``); an interrupted run of other inputs stays until deleted,
so that going back to those inputs continues it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from preprocessing.fileio import sha256_file, write_json

from ..config.params import RESULT_FIELDS, ScalingSettings
from ..layout import PROJECT_ROOT, shown

INPUTS_FILE = "inputs.json"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints, once it has one
PACKAGES = ("model", "preprocessing", "pipeline")
SHOWN_CHANGES = 3  # per kind of input in the "starts afresh" line


@dataclass(frozen=True)
class RunInputs:
    """What decides a training run's result: ``data`` (name -> hash), ``params`` (nested, JSON-able) and ``code``
    (module file relative to the project -> sha256)."""

    data: dict[str, str]
    params: dict
    code: dict[str, str]

    @property
    def key(self) -> str:
        """16 hex digits of their hash: the run's folder name."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def loaded_code(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """The sha256 of every module of the project's packages that this process has imported, by path under
    ``root``: the code a stage runs (its workers import the same modules)."""
    files = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path or module.__name__.split(".")[0] not in PACKAGES:
            continue
        path = Path(path).resolve()
        if path.is_relative_to(root.resolve()):
            files[path.relative_to(root.resolve()).as_posix()] = sha256_file(path)
    return dict(sorted(files.items()))


def run_inputs(data: dict[str, str], settings, scaling: ScalingSettings, **more) -> RunInputs:
    """A training run's inputs: ``data`` (name -> hash), its stage's ``settings`` (a pydantic model), the fields
    of ``scaling`` that change a result, ``more`` (e.g. the fold) and the code loaded now."""
    params = {"settings": settings.model_dump(mode="json"),
              "scaling": {field: getattr(scaling, field) for field in RESULT_FIELDS}, **more}
    return RunInputs(data=data, params=params, code=loaded_code())


def run_folder(storage: str | Path, name: str, inputs: RunInputs) -> tuple[Path, str]:
    """The folder of the run ``name`` with ``inputs`` under ``storage`` (made, with its ``inputs.json``), and what
    the stage should say about it: that it continues an interrupted run, that it starts afresh and why, or ''."""
    folder = Path(storage).resolve() / name / inputs.key
    said = ""
    if (folder / SNAPSHOT).is_file():
        said = "continues the interrupted run of the same data, params and code from its last checkpoint"
    else:
        others = sorted((run for run in folder.parent.glob("*") if (run / SNAPSHOT).is_file() and run != folder
                         and (run / INPUTS_FILE).is_file()), key=lambda run: (run / SNAPSHOT).stat().st_mtime)
        if others:
            earlier = RunInputs(**json.loads((others[-1] / INPUTS_FILE).read_text()))
            said = (f"starts afresh, as {'; '.join(changes(earlier, inputs)) or 'its inputs'} changed since the "
                    f"interrupted run in {shown(others[-1])} (kept: its inputs again continue it; delete it to free "
                    "its space)")
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / INPUTS_FILE).is_file():
        write_json(folder / INPUTS_FILE, asdict(inputs))
    return folder, said


def changes(before: RunInputs, after: RunInputs) -> list[str]:
    """What differs, a phrase per kind: ``the data (shards)``, ``params pretrain.epochs 5 -> 6``, ``the code
    (pipeline/train/loop.py)``."""
    said = []
    data = [name for name in sorted(before.data.keys() | after.data.keys())
            if before.data.get(name) != after.data.get(name)]
    if data:
        said.append(f"the data ({listed(data)})")
    params = [f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in
              sorted(differing(flat(before.params), flat(after.params)).items())]
    if params:
        said.append(f"params {listed(params)}")
    code = [path for path in sorted(before.code.keys() | after.code.keys())
            if before.code.get(path) != after.code.get(path)]
    if code:
        said.append(f"the code ({listed(code)})")
    return said


def listed(items: list[str]) -> str:
    more = len(items) - SHOWN_CHANGES
    return ", ".join(items[:SHOWN_CHANGES]) + (f" and {more} more" if more > 0 else "")


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing(before: dict, after: dict) -> dict:
    return {key: (before.get(key), after.get(key)) for key in before.keys() | after.keys()
            if before.get(key) != after.get(key)}


def forget(folder: str | Path) -> None:
    """Remove a run's folder once the stage wrote its outputs (and the run name's folder when no run is left)."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    if folder.parent.is_dir() and not any(folder.parent.iterdir()):
        folder.parent.rmdir()
