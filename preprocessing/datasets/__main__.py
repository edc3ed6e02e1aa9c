"""Write a dataset's manifest: ``python -m preprocessing.datasets <name> <root> <out.jsonl> [--list list.csv]``."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from preprocessing.datasets import ADAPTERS, DatasetLayoutError, build_manifest
from preprocessing.manifest import hash_media, write_manifest


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, build the manifest, write it; a layout problem exits with status 2."""
    parser = argparse.ArgumentParser(prog="python -m preprocessing.datasets", description=__doc__)
    parser.add_argument("name", choices=sorted(ADAPTERS), help="dataset name")
    parser.add_argument("root", help="the dataset folder, laid out as the adapter's docstring says")
    parser.add_argument("out", help="manifest path (.jsonl); its .info.json is written beside it")
    parser.add_argument("--list", dest="list_file", help="custom: the clip list, relative to the root (list.csv)")
    args = parser.parse_args(argv)
    try:
        info, clips = build_manifest(args.name, args.root, **({"list_file": args.list_file} if args.list_file else {}))
    except DatasetLayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    path = write_manifest(args.out, info, hash_media(clips, args.root, progress=tqdm))
    folds = Counter(clip.fold for clip in clips)
    print(f"{info.name}: {len(clips)} clips -> {path} (clips per fold: "
          f"{dict(sorted(folds.items(), key=lambda item: (item[0] is None, item[0] or 0)))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
