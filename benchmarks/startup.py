"""Stage start-up: the time from a training stage's command to its first training step, by phase.

    .venv/bin/python benchmarks/startup.py                        # pretrain and finetune, 3 runs each
    .venv/bin/python benchmarks/startup.py --runs 5 --stages pretrain --workdir /tmp/startup
    .venv/bin/python benchmarks/startup.py --code /tmp/before .   # an export of an older commit against this one
    .venv/bin/python benchmarks/startup.py --tiny                 # one run, one fold

Builds a tiny demo once in a work root (``--workdir``, kept; default a temporary folder): ``--clips`` demo clips
(``preprocessing.datasets.demo``), their manifest and shards, and a params file as tests/test_pipeline.py writes
it (model ``hicmae_test``, batch 2, 2 Ray Train workers of 0.5 CPU, folds 1 and 2 at once; ``--epochs`` 1), with
an MLflow SQLite store there. Then it runs each stage's real command (``python -m pipeline.cli --params P pretrain``,
``... finetune --dataset demo``), a fresh process as a test or a user runs it, ``--runs`` times, fine-tuning after
pre-training, and prints each phase's median (min-max):

- imports: from starting the command to the stage function (interpreter, the command's module and its imports);
- MLflow: importing MLflow where the stage does (pretrain), the stage's run and its child runs set up;
- Ray start: ``start_ray`` (a local Ray: GCS, raylet, dashboard, their Python processes);
- other: the rest of the stage before Ray Train (reading shards, the console's queue actor, the folds' Ray tasks
  starting and importing the stage's module);
- Ray Train start: from the first ``trainer.fit`` to the first training step in a worker (the controller, its
  actors and the workers started, their imports, the process group; then the model, the optimizer, the loader's
  first batch), split in the second table at the first worker's ``loop.fit``;
- first step: the first ``TrainStep`` call;
- rest to exit: training, results and MLflow's end, and then the process's exit, split in the second table: from
  the workers' end to ``fit`` returning (a fold's, on average), from the stage function's return to the interpreter's
  exit handlers (the console), the handlers (Ray's shutdown), and the interpreter's finalisation after them.

The phases come from the command's own processes: a ``sitecustomize`` module that this script writes and puts
first on the command's ``PYTHONPATH`` (so in every Python process Ray starts from it too) wraps the functions above
when their modules are imported and appends wall-clock stamps to a file; nothing in the pipeline knows of it.
The Python processes a command starts are counted (Ray's workers, actors and agents). With several ``--code``
folders (project trees, e.g. ``git archive`` exports) each run runs every stage from each, alternating which goes
first, and the stages' result files (weights, metrics, predictions, plots) must be identical in every run: the
script says whether they were. Beside the runs, ``--import-runs`` fresh processes
``python -X importtime -c "import pipeline.cli, M"`` give the wall time of importing each stage's module and
``pipeline.tracking`` (what the stages and every rank-0 worker import for MLflow) and what the heaviest packages
cost (cumulative: a package first imported by another counts within that one too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.params import PROJECT_ROOT  # noqa: E402

STAGES = {"pretrain": ("pipeline.train.pretrain", ["pretrain"]),
          "finetune": ("pipeline.train.finetune", ["finetune", "--dataset", "demo"])}
PHASES = ("imports", "mlflow", "ray", "other", "raytrain", "first_step", "rest")
TITLES = {"imports": "imports", "mlflow": "MLflow", "ray": "Ray start", "other": "other", "raytrain": "Ray Train start",
          "first_step": "first step", "rest": "rest to exit"}
DETAILS = ("to_worker_fit", "worker_fit_to_step", "training_to_return", "fit_return", "to_atexit", "atexit",
           "finalise", "processes")
DETAIL_TITLES = {"to_worker_fit": "fit -> workers' fit", "worker_fit_to_step": "workers' fit -> step",
                 "training_to_return": "step -> stage returns", "fit_return": "workers done -> fit returns",
                 "to_atexit": "-> exit handlers", "atexit": "exit handlers", "finalise": "finalisation",
                 "processes": "Python processes"}
IMPORTED = ("pipeline.tracking",)  # beside the stages' modules
PACKAGES = ("torch", "torch._dynamo", "ray", "ray.train", "ray.data", "mlflow", "pandas", "scipy.stats", "sklearn",
            "matplotlib", "webdataset", "pyarrow", "cv2", "mediapipe")
STAMPS = "STARTUP_STAMPS"  # this script's: where the command's processes append their stamps

# What every process of a timed command runs at start (site imports it): stamps around the functions that mark the
# phases, wrapped when their modules have been imported, whichever process imports them.
SITECUSTOMIZE = textwrap.dedent('''
    import atexit, contextlib, functools, json, os, sys, time
    from importlib.abc import MetaPathFinder

    PATH = os.environ.get("STARTUP_STAMPS")

    def stamp(event, **extra):
        line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **extra}) + "\\n"
        fd = os.open(PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def timed(function, name, **extra):
        @functools.wraps(function)
        def call(*args, **kwargs):
            stamp(name + "_begin", **extra)
            try:
                result = function(*args, **kwargs)
            finally:
                stamp(name + "_end", **extra)
            if name == "start_ray":
                stamp("ray_started" if result else "ray_was_up")
            if name == "stage":  # runs first of the handlers (last in, first out): ray.shutdown's, MLflow's, ...
                atexit.register(stamp, "atexit_first")
            return result
        return call

    def timed_run(function):
        @contextlib.contextmanager
        @functools.wraps(function)
        def run(*args, **kwargs):
            stamp("mlflow_setup_begin")
            with function(*args, **kwargs) as active:
                stamp("mlflow_setup_end")
                try:
                    yield active
                finally:
                    stamp("mlflow_close_begin")
            stamp("mlflow_close_end")
        return run

    def first_call(function, name):
        done = []
        @functools.wraps(function)
        def call(*args, **kwargs):
            if done:
                return function(*args, **kwargs)
            done.append(True)
            stamp(name + "_begin")
            try:
                return function(*args, **kwargs)
            finally:
                stamp(name + "_end")
        return call

    def ray_runtime(module):
        module.start_ray = timed(module.start_ray, "start_ray")

    def tracking(module):
        stamp("tracking_imported")
        module.start_stage_run = timed_run(module.start_stage_run)
        module.start_child_run = timed(module.start_child_run, "mlflow_child")

    def torch_trainer(module):
        module.TorchTrainer.fit = timed(module.TorchTrainer.fit, "trainer_fit")

    def loop(module):
        module.fit = timed(module.fit, "worker_fit")
        module.TrainStep.__call__ = first_call(module.TrainStep.__call__, "step")

    def stage(function):
        def hook(module):
            stamp("stage_module_imported")
            setattr(module, function, timed(getattr(module, function), "stage"))
        return hook

    HOOKS = {"preprocessing.ray_runtime": ray_runtime, "pipeline.tracking": tracking, "ray.train.torch": torch_trainer,
             "pipeline.train.loop": loop, "pipeline.train.pretrain": stage("stage_pretrain"),
             "pipeline.train.finetune": stage("stage_finetune"), "mlflow": lambda module: stamp("mlflow_imported")}
    BEFORE = {"pipeline.tracking": "tracking_import_begin", "mlflow": "mlflow_import_begin"}

    class Hooks(MetaPathFinder):
        """Finds nothing itself: runs a hook after the other finders' loader has executed a hooked module."""

        def find_spec(self, name, path, target=None):
            if name not in HOOKS:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            if name in BEFORE:
                stamp(BEFORE[name])
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                HOOKS[name](module)

            spec.loader.exec_module = exec_module
            return spec

    if PATH:
        stamp("python", argv=" ".join(sys.argv[:2])[-120:])
        sys.meta_path.insert(0, Hooks())
        atexit.register(stamp, "atexit_last")  # runs last: then the interpreter's finalisation
''')


def write_hooks(folder: Path) -> Path:
    """``folder`` with the stamping ``sitecustomize`` in it: what goes first on a timed command's ``PYTHONPATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def write_params(work: Path, epochs: int, folds: list[int]) -> Path:
    """The tiny run of tests/test_pipeline.py (one epoch by default)."""
    params = {
        "datasets": {"demo": {"root": str(work / "raw")}},
        "experiment": "startup",
        "preprocess": {"shard_size": 8},
        "pretrain": {"dataset": "demo", "model": {"size": "hicmae_test"}, "epochs": epochs, "batch_size": 2,
                     "optim": {"warmup_epochs": 0}},
        "finetune": {"model": {"size": "hicmae_test"}, "epochs": epochs, "batch_size": 2, "folds": folds,
                     "optim": {"warmup_epochs": 0, "layer_decay": 0.75}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "preprocess_workers": 0},
    }
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def stage_env(work: Path, code: Path, hooks: Path | None = None, stamps: Path | None = None) -> dict:
    """The command's environment: ``code`` first on the path, a local Ray, the work root, and an MLflow SQLite
    store with its artifacts there (``tracking.store_root``)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    path = [str(hooks)] if hooks else []
    env.update(HICMAE_WORKDIR=str(work), MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", DVC_ROOT=str(work),
               PYTHONPATH=os.pathsep.join([*path, str(code), *filter(None, [env.get("PYTHONPATH")])]))
    if stamps:
        env[STAMPS] = str(stamps)
    return env


def hicmae(code: Path, params: Path, argv: list[str], env: dict, log: Path) -> tuple[float, float]:
    """Run ``python -m pipeline.cli --params P ARGV`` from ``code``, its output to ``log``; (began, ended)
    in wall-clock time (exits on failure, naming the log)."""
    began = time.time()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--params", str(params), *argv], cwd=code,
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
        status = process.wait()
    ended = time.time()
    if status:
        sys.exit(f"benchmarks/startup.py: {' '.join(argv)} failed (exit {status}); see {log}")
    return began, ended


def build_demo(work: Path, clips: int, epochs: int, folds: list[int]) -> Path:
    """The demo's clips, manifest and shards in ``work`` (kept when already there); returns the params file.
    Preprocessing runs in the stage's own process (``preprocess_workers: 0``): no Ray for it."""
    from preprocessing.datasets.demo import generate_demo

    params = write_params(work, epochs, folds)
    if not (work / "data/demo/processed/summary.json").is_file():
        generate_demo(work / "raw", seed=0, speakers=5, clips_per_speaker=max(1, clips // 5))
        for argv in (["manifest", "--dataset", "demo"], ["preprocess", "--dataset", "demo"]):
            hicmae(PROJECT_ROOT, params, argv, stage_env(work, PROJECT_ROOT), work / f"{argv[0]}.log")
    return params


def phases(events: list[dict], began: float, ended: float) -> dict:
    """One run's phases (seconds) from its stamps; see the module docstring. The stage function runs in a forked
    child of the command (``pipeline.supervisor``, a session of its own): the process that stamped its begin."""
    stage_pid = next(e["pid"] for e in events if e["event"] == "stage_begin")

    def first(event: str, pid: int | None = None) -> dict | None:
        return next((e for e in events if e["event"] == event and pid in (None, e["pid"])), None)

    def spans(name: str, before: float) -> float:
        begins = [e["t"] for e in events if e["event"] == f"{name}_begin" and e["t"] < before]
        ends = [e["t"] for e in events if e["event"] == f"{name}_end"]
        return sum(end - begin for begin, end in zip(begins, ends, strict=False))

    stage = first("stage_begin", stage_pid)["t"]
    fit = first("trainer_fit_begin")["t"]
    step = min((e for e in events if e["event"] == "step_begin"), key=lambda e: e["t"])
    step_end = first("step_end", step["pid"])["t"]
    worker_fit = min(e["t"] for e in events if e["event"] == "worker_fit_begin")
    stage_end = first("stage_end", stage_pid)["t"]
    mlflow = spans("mlflow_setup", fit) + spans("mlflow_child", fit)
    imports = sorted((first(f"{name}_import_begin", stage_pid)["t"], first(f"{name}_imported", stage_pid)["t"])
                     for name in ("mlflow", "tracking") if first(f"{name}_imported", stage_pid))
    covered = stage  # MLflow and the tracking module imported by the stage function itself (pretrain's): their union
    for begin, end in imports:
        mlflow += max(0.0, end - max(begin, covered))
        covered = max(covered, end)
    ray, mine = 0.0, [e for e in events if e["pid"] == stage_pid]  # stamps of a process are in their order
    for index, event in enumerate(mine):  # the call that started Ray: its begin, its end, then "ray_started"
        if event["event"] == "ray_started":
            ray = mine[index - 1]["t"] - max(e["t"] for e in mine[:index] if e["event"] == "start_ray_begin")
    handlers, last = first("atexit_first", stage_pid)["t"], first("atexit_last", stage_pid)["t"]
    done = [e["t"] for e in events if e["event"] == "worker_fit_end"]
    returns = [e["t"] - max(t for t in done if t <= e["t"]) for e in events if e["event"] == "trainer_fit_end"]
    return {"total": ended - began, "imports": stage - began, "mlflow": mlflow, "ray": ray,
            "other": fit - stage - mlflow - ray, "raytrain": step["t"] - fit, "first_step": step_end - step["t"],
            "rest": ended - step_end, "to_worker_fit": worker_fit - fit, "worker_fit_to_step": step["t"] - worker_fit,
            "training_to_return": stage_end - step_end, "fit_return": statistics.mean(returns),
            "to_atexit": handlers - stage_end, "atexit": last - handlers, "finalise": ended - last,
            "processes": len({e["pid"] for e in events if e["event"] == "python"})}  # some exec another Python


def outputs_hash(work: Path, stage: str) -> str:
    """sha256 over the stage's result files (runs/pretrain/, runs/demo/: weights, metrics, predictions, plots)."""
    folder = work / "runs" / ("pretrain" if stage == "pretrain" else "demo")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def time_stage(name: str, code: Path, params: Path, work: Path, hooks: Path, run: int) -> dict:
    """One timed run of a stage's command from ``code``."""
    folder = work / "startup-runs"
    folder.mkdir(exist_ok=True)
    stamps = folder / f"{name}-{code.name}-{run}.jsonl"
    stamps.unlink(missing_ok=True)
    load = os.getloadavg()[0]
    began, ended = hicmae(code, params, STAGES[name][1], stage_env(work, code, hooks, stamps),
                          stamps.with_suffix(".log"))
    events = [json.loads(line) for line in stamps.read_text().splitlines()]
    if not any(e["event"] == "stage_begin" for e in events):
        sys.exit(f"benchmarks/startup.py: {name} left no stamp of its stage function in {stamps}")
    return {"stage": name, "code": str(code), "run": run, "load": load, **phases(events, began, ended),
            "outputs": outputs_hash(work, name)}


def import_time(code: Path, module: str) -> dict:
    """One fresh ``python -X importtime -c "import pipeline.cli, MODULE"`` from ``code``: its wall time and the
    packages' cumulative seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}
    began = time.time()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import pipeline.cli, {module}"], cwd=code,
                          env=env, capture_output=True, text=True, check=True)
    wall = time.time() - began
    seen = {}
    for match in re.finditer(r"^import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)$", done.stderr, re.M):
        seen.setdefault(match[2], int(match[1]) / 1e6)
    return {"wall": wall, **{name: seen.get(name, 0.0) for name in PACKAGES}}


def import_times(codes: list[Path], modules: list[str], runs: int) -> list[dict]:
    """Medians of ``import_time`` over ``runs``, codes alternating which goes first."""
    samples: dict[tuple[str, str], list[dict]] = {(str(code), module): [] for code in codes for module in modules}
    for run in range(runs):
        for code in codes if run % 2 == 0 else codes[::-1]:
            for module in modules:
                samples[str(code), module].append(import_time(code, module))
    return [{"code": code, "module": module, "wall": statistics.median(s["wall"] for s in values),
             "packages": {name: statistics.median(s[name] for s in values) for name in PACKAGES}}
            for (code, module), values in samples.items() if values]


def cell(rows: list[dict], key: str, digits: int = 1) -> str:
    values = [row[key] for row in rows]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def print_tables(rows: list[dict], imports: list[dict], labels: dict[str, str]) -> None:
    groups = [(code, stage, [r for r in rows if (r["code"], r["stage"]) == (code, stage)])
              for code in labels for stage in STAGES]
    groups = [group for group in groups if group[2]]
    columns = ("total", *PHASES)
    print("\nseconds, median (min-max) over the runs:")
    print("| code | stage | runs | load | " + " | ".join(TITLES.get(c, c) for c in columns) + " |")
    print("|---" * (len(columns) + 4) + "|")
    for code, stage, mine in groups:
        loads = [row["load"] for row in mine]
        print(f"| {labels[code]} | {stage} | {len(mine)} | {min(loads):.0f}-{max(loads):.0f} | "
              + " | ".join(cell(mine, c) for c in columns) + " |")
    print("\n| code | stage | " + " | ".join(DETAIL_TITLES[d] for d in DETAILS) + " |")
    print("|---" * (len(DETAILS) + 2) + "|")
    for code, stage, mine in groups:
        print(f"| {labels[code]} | {stage} | "
              + " | ".join(f"{statistics.median(r[d] for r in mine):.{0 if d == 'processes' else 1}f}"
                           for d in DETAILS) + " |")
    if imports:
        print("\nimport chain, median seconds (cumulative per package; one imported by another counts in both):")
        print("| code | module | wall | " + " | ".join(PACKAGES) + " |")
        print("|---" * (len(PACKAGES) + 3) + "|")
        for row in imports:
            print(f"| {labels[row['code']]} | {row['module']} | {row['wall']:.2f} | "
                  + " | ".join(f"{row['packages'][name]:.2f}" for name in PACKAGES) + " |")
    for stage in STAGES:
        hashes = {row["outputs"] for row in rows if row["stage"] == stage}
        if hashes:
            print(f"{stage} outputs: {'identical in all runs' if len(hashes) == 1 else 'DIFFER between runs'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each stage's command (medians)")
    parser.add_argument("--import-runs", type=int, help="timed import chains per stage (default: --runs)")
    parser.add_argument("--code", type=Path, nargs="+", default=[PROJECT_ROOT],
                        help="project folders to run, in turn within each run (e.g. an export of an older commit)")
    parser.add_argument("--clips", type=int, default=10, help="demo clips (5 speakers)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 2], help="fine-tuning folds (at once)")
    parser.add_argument("--workdir", type=Path, help="work root to build the demo in and keep (default: temporary)")
    parser.add_argument("--tiny", action="store_true", help="quick: one run of each stage, one fold, one import chain")
    parser.add_argument("--json", type=Path, help="also write every run's phases here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.runs, args.folds, args.import_runs = 1, [1], 1
    args.import_runs = args.runs if args.import_runs is None else args.import_runs
    args.code = [path.resolve() for path in args.code]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    labels = {str(code): "this checkout" if code == PROJECT_ROOT else code.name for code in args.code}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        work = (args.workdir or Path(tmp) / "work").resolve()
        work.mkdir(parents=True, exist_ok=True)
        hooks = write_hooks(Path(tmp) / "hooks")
        began = time.time()
        params = build_demo(work, args.clips, args.epochs, args.folds)
        print(f"demo of {args.clips} clips in {work} ({time.time() - began:.0f} s); {os.cpu_count()} cores",
              flush=True)
        if "pretrain" not in args.stages and not (work / "runs/pretrain/checkpoint.pt").is_file():
            hicmae(args.code[0], params, ["pretrain"], stage_env(work, args.code[0]), work / "pretrain.log")
        imports = import_times(args.code, [*(STAGES[name][0] for name in args.stages), *IMPORTED], args.import_runs)
        rows = []
        for run in range(args.runs):
            codes = args.code if run % 2 == 0 else args.code[::-1]  # alternating which goes first
            for code in codes:
                for name in args.stages:  # in turn: fine-tuning starts from this pre-training checkpoint
                    row = time_stage(name, code, params, work, hooks, run)
                    rows.append(row)
                    print(f"  run {run + 1} {labels[str(code)]:<14} {name:<8} load {row['load']:4.1f}  total "
                          f"{row['total']:5.1f} s  " + "  ".join(f"{TITLES[p]} {row[p]:.1f}" for p in PHASES),
                          flush=True)
    print_tables(rows, imports, labels)
    result = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "runs": rows, "imports": imports,
              "command": " ".join(["benchmarks/startup.py", *(sys.argv[1:] if argv is None else argv)])}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
