"""The ``hicmae`` command: one sub-command per pipeline stage (what ``dvc.yaml`` runs).

    hicmae manifest   --dataset demo
    hicmae preprocess --dataset demo
    hicmae pretrain
    hicmae finetune   --dataset demo [--set finetune.epochs=3]
    hicmae report
    hicmae predict VIDEO --model runs/demo/finetune/fold-1/model [--out r.json] [--preview p.png|p.mp4]
    hicmae export --dataset demo --fold 1   (a fold's newest fine-tuning checkpoint, e.g. unfinished)
    hicmae ablations [--run | --queue] [NAME ...]   (conf/ablations.yaml as DVC experiments)

Every command reads ``params.yaml`` (``--params`` for another file) and applies ``--set key=value`` overrides.
A bad parameter, an unknown dataset or a missing input is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from preprocessing.errors import InputError

from .config import PROJECT_ROOT, load_params

# Each stage command's module and function. A command imports only its own module, when it runs, so the code a
# DVC stage runs (what it must depend on) is that module's import closure: tests/test_wiring.py checks dvc.yaml.
STAGE_COMMANDS = {
    "manifest": ("pipeline.prepare", "stage_manifest"),
    "preprocess": ("pipeline.prepare", "stage_preprocess"),
    "pretrain": ("pipeline.pretrain", "stage_pretrain"),
    "finetune": ("pipeline.folds", "stage_finetune"),
    "report": ("pipeline.report", "stage_report"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hicmae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(PROJECT_ROOT / "params.yaml"), help="parameter file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter (dotted key, YAML value); repeatable")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("manifest", "preprocess", "finetune"):
        commands.add_parser(name).add_argument("--dataset", required=True)
    commands.add_parser("pretrain")
    commands.add_parser("report")
    predict = commands.add_parser("predict", help="the emotion in one video file: face track, windows, clip")
    predict.add_argument("video", help="a video file with a face and sound")
    predict.add_argument("--model", required=True,
                         help="an exported model (folder or .safetensors) or a reference fine-tuned .pth")
    predict.add_argument("--out", help="result JSON (default: <video name>.prediction.json here)")
    predict.add_argument("--preview", help="also write frames with the face box and label: .png or .mp4")
    predict.add_argument("--size", help="reference .pth only: hicmae_tiny, hicmae_small or hicmae_base")
    predict.add_argument("--classes", help="reference .pth only: class names in label order, comma-separated, "
                                           "or a dataset name (crema-d, mafw, ...)")
    predict.add_argument("--targets", help="reference .pth of a regression model: target names in order")
    predict.add_argument("--device", default="cpu", help="cpu or cuda")
    export = commands.add_parser("export", help="export a fine-tuning checkpoint (safetensors + model card)")
    export.add_argument("--dataset", required=True)
    export.add_argument("--fold", type=int, help="export the newest Ray checkpoint of this fold's fine-tuning")
    export.add_argument("--checkpoint", help="a fine-tuning Ray checkpoint folder (instead of the newest)")
    export.add_argument("--out", help="default: runs/<dataset>/finetune/fold-<fold>/model")
    ablations = commands.add_parser("ablations", help="list the paper's ablations, or run/queue them with dvc")
    ablations.add_argument("names", nargs="*", metavar="NAME", help="ablations of conf/ablations.yaml; default all")
    launch = ablations.add_mutually_exclusive_group()
    launch.add_argument("--run", action="store_true", help="run now, one after another (dvc exp run --temp)")
    launch.add_argument("--queue", action="store_true", help="queue (dvc exp run --queue); then dvc exp run --run-all")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "predict":
            return _predict(args)
        if args.command == "ablations":
            return _ablations(args)
        params = load_params(args.params, args.overrides)
        if args.command == "export":
            return _export(args, params)
        return _stage(args, params)
    except InputError as err:
        print(f"hicmae: error: {err}", file=sys.stderr)
        return 1


def _stage(args: argparse.Namespace, params) -> int:
    """Run a stage command (``STAGE_COMMANDS``) and print its result."""
    module, function = STAGE_COMMANDS[args.command]
    stage = getattr(importlib.import_module(module), function)  # heavy imports (Ray, MLflow) only now
    result = stage(params, args.dataset) if hasattr(args, "dataset") else stage(params)
    if args.command == "pretrain":
        print(json.dumps(result, indent=2))
    elif args.command == "finetune":
        print(json.dumps(result["best"], indent=2, default=float))
    elif args.command == "report":
        print(result)
    return 0


def _ablations(args: argparse.Namespace) -> int:
    from . import ablations

    chosen = ablations.select(args.names)
    if args.run or args.queue:
        ablations.launch(chosen, queue=args.queue)
    else:
        print(ablations.describe(chosen))
    return 0


def _export(args: argparse.Namespace, params) -> int:
    from .export import export_fold

    try:
        print(f"exported -> {export_fold(args.dataset, params, args.fold, args.checkpoint, args.out)}")
    except (FileNotFoundError, ValueError) as err:
        print(f"hicmae export: error: {err}", file=sys.stderr)
        return 1
    return 0


def _predict(args: argparse.Namespace) -> int:
    """``hicmae predict``: a short summary on stdout, the JSON in a file; a bad input is one line on stderr."""
    from preprocessing.decode import MediaError

    from .predict import names_option, predict, summary_text

    out = args.out or f"{Path(args.video).name}.prediction.json"
    try:
        classes, targets = names_option(args.classes, args.targets)
        result = predict(args.video, args.model, out, args.preview, size=args.size, classes=classes,
                         targets=targets, device=args.device)
    except (MediaError, FileNotFoundError, ValueError) as err:
        print(f"hicmae predict: error: {err}", file=sys.stderr)
        return 1
    print(summary_text(result))
    print(f"wrote {out}" + (f" and {args.preview}" if args.preview else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
