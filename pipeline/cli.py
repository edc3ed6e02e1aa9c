"""The ``hicmae`` command: one sub-command per pipeline stage (what ``dvc.yaml`` runs).

    hicmae manifest   --dataset demo
    hicmae preprocess --dataset demo
    hicmae pretrain
    hicmae finetune   --dataset demo [--set finetune.epochs=3]
    hicmae report
    hicmae predict VIDEO --model runs/demo/finetune/fold-1/model [--out r.json] [--preview p.png|p.mp4]
    hicmae predict VIDEO|FOLDER|LIST ... --model M --out predictions.csv [--embeddings e.parquet]   (Ray Data)
    hicmae export --dataset demo --fold 1   (a fold's newest fine-tuning checkpoint, e.g. unfinished)
    hicmae verify runs/demo/finetune/fold-1/model   (its card's test metrics computed again; models:/... too)
    hicmae ablations [--run | --queue] [NAME ...]   (conf/ablations.yaml as DVC experiments)

Every command reads ``params.yaml`` (``--params`` for another file) and applies ``--set key=value`` overrides.
A bad parameter, an unknown dataset or a missing input is one line on stderr and exit status 1. A training stage
stopped by SIGTERM or Ctrl-C saves a checkpoint at its next step and exits with status 75; the same command
continues it (``pipeline.train.preemption``). A stage prints a header, its progress and a summary
(``pipeline.console``); everything else goes to ``logs/<stage>.log`` and its MLflow run, or to the terminal as well
with ``--verbose`` (or ``HICMAE_VERBOSE=1``).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import sys

from preprocessing.errors import InputError, Interrupted

from .config.params import PROJECT_ROOT, load_params
from .console import VERBOSE, quiet_libraries, stage_console
from .layout import Layout
from .supervisor import supervise

# Each command's module and function, imported when the command runs and not before: the code a DVC stage runs
# (what it must depend on) is this module's imports plus its command's module's (tests/test_wiring.py checks
# dvc.yaml against them). Stage functions take the loaded params (and the dataset); the others the arguments.
COMMANDS = {
    "manifest": ("pipeline.prepare", "stage_manifest"),
    "preprocess": ("pipeline.prepare", "stage_preprocess"),
    "pretrain": ("pipeline.train.pretrain", "stage_pretrain"),
    "finetune": ("pipeline.train.finetune", "stage_finetune"),
    "report": ("pipeline.report", "stage_report"),
    "predict": ("pipeline.predict.many", "predict_many_command"),
    "export": ("pipeline.train.export", "export_command"),
    "verify": ("pipeline.train.verify", "verify_command"),
    "ablations": ("pipeline.ablations", "ablations_command"),
}
STAGES = ("manifest", "preprocess", "pretrain", "finetune", "report")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hicmae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(PROJECT_ROOT / "params.yaml"), help="parameter file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter (dotted key, YAML value); repeatable")
    parser.add_argument("--verbose", action="store_true",
                        help=f"show the details and the libraries' output live (also {VERBOSE}=1)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("manifest", "preprocess", "finetune"):
        commands.add_parser(name).add_argument("--dataset", required=True)
    commands.add_parser("pretrain")
    commands.add_parser("report")
    predict = commands.add_parser("predict", help="the emotion in videos: one video's face track, windows and clip "
                                                  "(JSON), or a table of many")
    predict.add_argument("inputs", nargs="+", metavar="VIDEO",
                         help="video files, folders (searched recursively) or clip lists (.csv, .jsonl: a path column)")
    predict.add_argument("--model", required=True,
                         help="an exported model (folder or .safetensors), a Hugging Face Hub repo id "
                              "(org/name[@revision]), a registered model (models:/hicmae-<dataset>@best, "
                              "models:/<name>/<version>) or a reference fine-tuned .pth")
    predict.add_argument("--out", help="one video: its result JSON (default: <video name>.prediction.json here); "
                                       "many: the table, .csv with a .jsonl beside it (re-running it resumes)")
    predict.add_argument("--preview", help="one video: also write frames with the face box and label: .png or .mp4")
    predict.add_argument("--embeddings", help="also write each clip's video, audio and fused embeddings (.parquet)")
    predict.add_argument("--workers", type=int, help="many: CPU actors decoding and finding faces (default: one per "
                                                     "CPU)")
    predict.add_argument("--model-workers", type=int, help="many: model actors (default: one per GPU, else one)")
    predict.add_argument("--batch-size", type=int, default=16, help="many: windows per model call")
    predict.add_argument("--size", help="reference .pth only: hicmae_tiny, hicmae_small or hicmae_base")
    predict.add_argument("--classes", help="reference .pth only: class names in label order, comma-separated, "
                                           "or a dataset name (crema-d, mafw, ...)")
    predict.add_argument("--targets", help="reference .pth of a regression model: target names in order")
    predict.add_argument("--device", help="cpu or cuda (one video, default cpu), or auto (many: GPUs where the Ray "
                                          "cluster has them; the default)")
    verify = commands.add_parser("verify", help="compute a fine-tuned model's test metrics again and compare them "
                                                "with its card (exit status 1 when they do not hold)")
    verify.add_argument("model", help="an exported model (folder, .safetensors, Hub repo id, models:/ URI)")
    verify.add_argument("--device", help="cpu (default: the numbers must be exact where they were recorded on a "
                                         "CPU) or cuda (within a tolerance)")
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
    if args.verbose:
        os.environ[VERBOSE] = "1"  # for this process and every process it starts
    quiet_libraries()  # before the command's module imports a library that reads its settings once
    # The interpreter's last garbage collections at exit walk every object the libraries made (~0.5 M: torch, Ray,
    # MLflow), seconds on a small machine, to free memory the process gives back anyway: after the exit handlers
    # (Ray's shutdown among them) those objects are frozen out of them. Registered once however often main runs.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    module, function = COMMANDS[args.command]
    dataset = getattr(args, "dataset", None)
    try:
        params = load_params(args.params, args.overrides) if args.command in STAGES else None
        command = getattr(importlib.import_module(module), function)  # heavy imports (Ray, MLflow) only now
        if params is None:
            return command(args)
        log_file = Layout.current().log_file(args.command, dataset)
        label = " ".join(filter(None, (args.command, dataset)))
        with stage_console(log_file, label, params.progress.show_every_s):
            command(params, dataset) if dataset else command(params)
    except InputError as err:
        print(f"hicmae: error: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"hicmae: {err}", file=sys.stderr)
        return Interrupted.EXIT_STATUS
    return 0


TRAINING = ("pretrain", "finetune")  # stages that stop at a step boundary on SIGTERM, and continue when run again


def entry(argv: list[str] | None = None) -> int:
    """The ``hicmae`` command: ``main``, with a training stage run in a process of its own session so that a
    SIGTERM or Ctrl-C to the command's process group reaches the stage as a stop request and not its Ray
    processes; if it has not stopped ``scaling.stop_grace_s`` seconds later it is killed
    (``supervisor``, ``pipeline.train.preemption``)."""
    argv = sys.argv[1:] if argv is None else argv
    args, _ = _parser().parse_known_args(argv)
    if args.command not in TRAINING or not hasattr(os, "fork"):
        return main(argv)
    try:
        grace = load_params(args.params, args.overrides).scaling.stop_grace_s
    except InputError:
        return main(argv)  # which says what is wrong
    return supervise(lambda: main(argv), grace)


if __name__ == "__main__":
    sys.exit(entry())
