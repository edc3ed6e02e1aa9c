"""Folds side by side: a dataset's ``finetune`` stage with all its folds at once against one fold after another.

    .venv/bin/python benchmarks/folds.py [--dataset demo] [--pairs 3] [--logs folds-logs/]

Runs the real stage command (``hicmae finetune --dataset D``) ``--pairs`` times each way, alternating which goes
first: ``--set scaling.concurrent_folds=1`` (one fold after another) and the default (as many folds at once as
the local Ray cluster holds). Needs the stage's inputs (after ``./run.sh demo``: the manifest, the shards and the
pre-training checkpoint) and rewrites the stage's outputs, as the command does: ``dvc repro`` afterwards puts
back what ``dvc.lock`` records.

Prints, per run, the wall time of the command, how busy the machine's cores were meanwhile (``/proc/stat``), the
median time between a fold's epoch lines, and when the first epoch line came; then each pair's ratio (folds at
once / one after another) and their median. Every run's per-fold test metrics and exported weights must equal the
first run's: the script fails if they do not.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.params import PROJECT_ROOT  # noqa: E402
from pipeline.layout import Layout  # noqa: E402

EPOCH_LINE = re.compile(r"fold (\d+): epoch (\d+)/(\d+) ")


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def run_stage(dataset: str, concurrent: int | None, log: Path) -> dict:
    """One ``hicmae finetune`` run; its wall time, core use, epoch lines' timing and results."""
    overrides = ["--set", f"scaling.concurrent_folds={concurrent}"] if concurrent else []
    command = [sys.executable, "-m", "pipeline.cli", *overrides, "finetune", "--dataset", dataset]
    epochs: dict[int, list[float]] = {}
    busy0, total0 = cpu_times()
    began = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in process.stdout:
            now = time.perf_counter() - began
            out.write(f"{now:8.2f} {line}")
            if match := EPOCH_LINE.search(line):
                epochs.setdefault(int(match[1]), []).append(now)
        if process.wait():
            sys.exit(f"benchmarks/folds.py: {' '.join(command)} failed (exit {process.returncode}); see {log}")
    wall = time.perf_counter() - began
    busy1, total1 = cpu_times()
    gaps = [b - a for times in epochs.values() for a, b in itertools.pairwise(times)]
    return {"wall_s": wall, "cores_busy": (busy1 - busy0) / (total1 - total0) * os.cpu_count(),
            "epoch_s": statistics.median(gaps) if gaps else float("nan"),
            "first_epoch_s": min(times[0] for times in epochs.values()) if epochs else float("nan"),
            "results": fold_results(dataset)}


def fold_results(dataset: str) -> dict[int, dict]:
    """Each fold's test metrics and the sha256 of its exported weights, as the stage left them."""
    out = Layout.current().finetune(dataset)
    results = {}
    for fold_dir in sorted(out.folder.glob("fold-*")):
        fold = int(fold_dir.name.split("-")[1])
        run = out.fold(fold)
        weights = hashlib.sha256((run.model / "model.safetensors").read_bytes()).hexdigest()
        results[fold] = {"test": json.loads(run.test_metrics.read_text()), "weights": weights}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--logs", type=Path, default=Path("folds-logs"), help="each run's timed output")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    modes = {"one after another": 1, "folds at once": None}
    rows, ratios, reference = [], [], None
    for pair in range(args.pairs):
        order = list(modes) if pair % 2 == 0 else list(reversed(modes))
        walls = {}
        for mode in order:
            log = args.logs / f"pair{pair + 1}-{'sequential' if modes[mode] else 'concurrent'}.log"
            run = run_stage(args.dataset, modes[mode], log)
            reference = reference or run["results"]
            if run["results"] != reference:
                sys.exit(f"benchmarks/folds.py: pair {pair + 1}, {mode}: fold results differ from the first run's")
            walls[mode] = run["wall_s"]
            rows.append((pair + 1, mode, run))
            print(f"pair {pair + 1}  {mode:<18} {run['wall_s']:7.1f} s  cores busy {run['cores_busy']:.2f}  "
                  f"epoch {run['epoch_s']:.1f} s  first epoch line at {run['first_epoch_s']:.1f} s", flush=True)
        ratios.append(walls["folds at once"] / walls["one after another"])
        print(f"pair {pair + 1}  ratio {ratios[-1]:.3f}x", flush=True)
    print(f"\n{args.dataset}: {len(reference)} folds, {os.cpu_count()} cores; results identical in all "
          f"{len(rows)} runs")
    print("| pair | mode | wall | cores busy | epoch | first epoch line |\n|---|---|---|---|---|---|")
    for pair, mode, run in rows:
        print(f"| {pair} | {mode} | {run['wall_s']:.1f} s | {run['cores_busy']:.2f} | {run['epoch_s']:.1f} s | "
              f"{run['first_epoch_s']:.1f} s |")
    print(f"ratios: {', '.join(f'{r:.3f}x' for r in ratios)}; median {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()
