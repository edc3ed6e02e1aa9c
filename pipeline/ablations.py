"""The paper's ablations (``conf/ablations.yaml``) launched as DVC experiments.

    ablations = load_ablations()                    # name -> Ablation(description, paper, set)
    check_ablations(ablations, "params.yaml")       # every override names an existing key and validates
    exp_run_command("audio_only", ablations["audio_only"], queue=True)
    # ['dvc', 'exp', 'run', '--queue', '-n', 'audio_only', '-S', 'variant=audio_only',
    #  '-S', 'finetune.model.overrides.modality=audio']

Each experiment also sets ``variant=<name>``, the tag its MLflow runs carry (``pipeline/tracking.py``).
"""

from __future__ import annotations

import re
import subprocess
from itertools import chain
from pathlib import Path

from pydantic import Field

from .config.params import PROJECT_ROOT, Strict, load_params, read_yaml, validate
from .config.training import training_params

ABLATIONS_FILE = PROJECT_ROOT / "conf" / "ablations.yaml"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # usable as a DVC experiment (git ref) name


class Ablation(Strict):
    description: str
    paper: str = Field(description="the paper's result this is compared with")
    set: list[str] = Field(min_length=1, description="`dvc exp run -S` overrides: dotted key=value")

    def first_stage(self) -> str:
        """'pretrain' when any override is under pretrain (then everything after it re-runs), else 'finetune'."""
        return "pretrain" if any(item.startswith("pretrain.") for item in self.set) else "finetune"


def load_ablations(path: str | Path = ABLATIONS_FILE) -> dict[str, Ablation]:
    tree = read_yaml(path)
    bad = [name for name in tree if not NAME.fullmatch(str(name))]
    if bad:
        raise ValueError(f"{path}: ablation name(s) {', '.join(map(str, bad))} are not usable as experiment names "
                         "(letters, digits, '_', '.', '-')")
    return {name: validate(Ablation, entry, f"{path}: {name}") for name, entry in tree.items()}


def overrides(name: str, ablation: Ablation) -> list[str]:
    """What ``dvc exp run -S`` sets: the variant's name, then the ablation's own changes."""
    return [f"variant={name}", *ablation.set]


def _has_key(tree: dict, dotted: str) -> bool:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def check_ablations(ablations: dict[str, Ablation], params_path: str | Path) -> None:
    """Every override changes a key that ``params_path`` already has (``-S`` cannot add keys) to a valid value."""
    tree = read_yaml(params_path)
    for name, ablation in ablations.items():
        missing = [item.split("=", 1)[0] for item in overrides(name, ablation)
                   if not _has_key(tree, item.split("=", 1)[0])]
        if missing:
            raise ValueError(f"ablation {name}: {', '.join(missing)} not in {params_path} "
                             "(dvc exp run -S changes existing keys only)")
        try:
            training_params(load_params(params_path, overrides(name, ablation)))
        except ValueError as err:
            raise ValueError(f"ablation {name}: {err}") from None


def exp_run_command(name: str, ablation: Ablation, queue: bool) -> list[str]:
    """``dvc exp run`` queued, or run now in a temporary copy (``--temp``) so the workspace stays as it is."""
    sets = chain.from_iterable(("-S", item) for item in overrides(name, ablation))
    return ["dvc", "exp", "run", "--queue" if queue else "--temp", "-n", name, *sets]


def describe(ablations: dict[str, Ablation]) -> str:
    lines = []
    for name, ablation in ablations.items():
        lines += [f"{name}  (re-runs {ablation.first_stage()} onwards)", f"    {ablation.description}",
                  f"    paper: {ablation.paper}", f"    set: {' '.join(ablation.set)}"]
    return "\n".join(lines)


def select(names: list[str], path: str | Path = ABLATIONS_FILE) -> dict[str, Ablation]:
    """The named ablations (all when ``names`` is empty), in the order given."""
    ablations = load_ablations(path)
    unknown = [name for name in names if name not in ablations]
    if unknown:
        raise ValueError(f"unknown ablation(s) {', '.join(unknown)}; {path} defines {', '.join(ablations)}")
    return {name: ablations[name] for name in names or ablations}


def launch(ablations: dict[str, Ablation], queue: bool, params_path: str | Path = PROJECT_ROOT / "params.yaml") -> None:
    """Check the ablations against ``params.yaml``, then queue them or run them one after another."""
    check_ablations(ablations, params_path)
    for index, (name, ablation) in enumerate(ablations.items(), 1):
        command = exp_run_command(name, ablation, queue)
        print(f"[{index}/{len(ablations)}] {' '.join(command)}", flush=True)
        subprocess.run(command, cwd=Path(params_path).parent, check=True)
    if queue:
        print("queued; run them with: dvc exp run --run-all (or dvc queue start)")


def ablations_command(args) -> int:
    """``hicmae ablations [--run | --queue] [NAME ...]``: list the ablations, or run or queue them."""
    chosen = select(args.names)
    if args.run or args.queue:
        launch(chosen, queue=args.queue)
    else:
        print(describe(chosen))
    return 0

