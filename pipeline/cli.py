"""The ``hicmae`` command: one sub-command per pipeline stage (what ``dvc.yaml`` runs).

    hicmae manifest   --dataset demo
    hicmae preprocess --dataset demo
    hicmae pretrain
    hicmae finetune   --dataset demo [--set finetune.epochs=3]
    hicmae report

Every command reads ``params.yaml`` (``--params`` for another file) and applies ``--set key=value`` overrides.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import PROJECT_ROOT, load_params


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from . import stages  # heavy imports (Ray, MLflow) only once the arguments are valid

    params = load_params(args.params, args.overrides)
    if args.command == "manifest":
        stages.stage_manifest(args.dataset, params)
    elif args.command == "preprocess":
        stages.stage_preprocess(args.dataset, params)
    elif args.command == "pretrain":
        print(json.dumps(stages.stage_pretrain(params), indent=2))
    elif args.command == "finetune":
        print(json.dumps(stages.stage_finetune(args.dataset, params)["best"], indent=2, default=float))
    elif args.command == "report":
        print(stages.stage_report(params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
