"""Fixtures shared by the test modules (pytest finds them here; no test module imports another).

The reference-parity tests (model, fbank, folds) read ``../shared/fixtures`` beside the checkout. Where it is
absent they skip with the reason; under CI (``CI`` set) or with ``--require-reference`` they fail instead, so the
promise that the model equals the reference is checked on every CI run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from demo_data import DEMO_CLIPS, demo_params
from demo_run import DemoRun, run_demo_pipeline
from filelock import FileLock
from mlflow_server import MlflowServer, running_mlflow_server

from preprocessing.datasets.demo import generate_demo
from preprocessing.face_model import ensure_face_models

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def pytest_addoption(parser) -> None:
    parser.addoption("--require-reference", action="store_true",
                     help=f"fail, not skip, the reference-parity tests when {SHARED_FIXTURES} is absent "
                          "(always the case when CI is set)")


def pytest_configure(config) -> None:
    # Ray's authentication mode as the stages set it (pipeline.console.quiet_libraries) before they import Ray, set
    # here before any test module does: Ray reads it once, when first imported. In a test process that imported Ray
    # before its first in-process stage (a test calling the preprocessing code directly, say), a local Ray started
    # later would require a token that this process does not send ("Failed to start GCS ... InvalidAuthToken").
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")


MODULE_SECONDS: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report) -> None:
    """Each module's wall time, its fixtures' set-up and tear-down included (printed at the end of the run; with
    several test processes the reports reach the main one)."""
    MODULE_SECONDS[report.nodeid.split("::")[0]] += report.duration


# The test processes (``./run.sh test`` starts three, pytest-xdist) take whole groups (``TestGroups``): a module is a
# group, so that its module-scoped fixtures are made once. The groups are handed out in this order, the longest first
# (from CI's "time per module"), so that no process is left with a long group at the end; the rest follow in
# collection order. The session fixtures that take minutes (``demo_shards``, ``demo_run``) are made once for all
# processes, by the first that needs them (``made_once``), while the others wait: the first module here makes the
# end-to-end run (test_preemption: the longest of its users, ~5 minutes of ``demo_run`` plus ~6 of its own) and the
# next ones, as many as there are processes, do not need it (the others of its users come after them, when it is
# made). A process takes its next group before the last test of the one it runs (pytest-xdist's workers keep one test
# back), so a group of one test starts with the next one on the same process.
DEMO_RUN_FIRST = "tests/test_preemption.py"
# test_compile_stages before test_compile: on an empty inductor cache (CI's) the stages compile the step's kernels
# and test_compile finds them on disk; the other way round, the stages' workers still compile most of theirs
# (evaluation's, DDP's), and the two modules took 280 s more in all.
LONGEST_FIRST = (DEMO_RUN_FIRST, "tests/test_dvc.py", "tests/test_ray_nodes.py", "tests/test_tracking_outage.py",
                 "tests/test_compile_stages.py", "tests/test_custom_pipeline.py", "tests/test_ray_cluster.py",
                 "tests/test_compile.py", "tests/test_accumulation.py", "tests/test_folds.py",
                 "tests/test_full_disk.py", "tests/test_predict_many.py", "tests/test_pipeline.py",
                 "tests/test_registry.py", "tests/test_export_hub.py", "tests/test_divergence.py")


def pytest_collection_modifyitems(config, items) -> None:
    missing = [name for name in LONGEST_FIRST if not (config.rootpath / name).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py: LONGEST_FIRST names no module {', '.join(missing)}")
    unplanned = sorted({item.nodeid.split("::")[0] for item in items if "demo_run" in item.fixturenames} -
                       set(LONGEST_FIRST))
    if unplanned:  # would start at any time: at the end, or while the run is made, waiting for it
        raise pytest.UsageError(f"tests/conftest.py: add {', '.join(unplanned)} to LONGEST_FIRST (they use demo_run, "
                                f"after {DEMO_RUN_FIRST} and the next groups, as many as test processes)")
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable within a rank


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Whole modules to each test process, in collection order (``LONGEST_FIRST`` first); a process gets its next
    module only when the one it runs has a single test left (pytest-xdist's default: two), so that a long module
    does not hold back the next one while the other processes could start it."""
    from xdist.scheduler import LoadScopeScheduling

    class TestGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid.split("::")[0]

        def _reschedule(self, node) -> None:
            if not node.shutting_down and self.workqueue and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    return TestGroups(config, log)


def pytest_terminal_summary(terminalreporter) -> None:
    if not MODULE_SECONDS:
        return
    terminalreporter.section("time per module")
    for module, seconds in sorted(MODULE_SECONDS.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f} s  {module}")
    terminalreporter.write_line(f"{sum(MODULE_SECONDS.values()):8.1f} s  in all")


@pytest.fixture(scope="session")
def reference_file(pytestconfig) -> Callable[[str], Path]:
    """A file of ``../shared/fixtures`` by its path there; a skip where it is absent, a failure under CI."""
    required = bool(os.environ.get("CI")) or pytestconfig.getoption("--require-reference")

    def find(relative: str) -> Path:
        path = SHARED_FIXTURES / relative
        if not path.is_file():
            message = f"reference fixture {path} is absent"
            if required:
                pytest.fail(f"{message}: the reference-parity tests must run (CI is set or --require-reference)")
            pytest.skip(message)
        return path

    return find


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """One real ``mlflow server`` on loopback for the whole test run (tests/mlflow_server.py); tests point
    ``MLFLOW_TRACKING_URI`` at ``mlflow_server.url`` and read back through ``get`` / ``post``."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder ``name`` that ``make`` fills, once a test run: with several test processes, by the first that gets
    here, under a lock in the base temp's parent, while the others wait; they then read it. If it failed, the others
    fail at once with its error rather than making it again."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.mktemp(name)
        make(root)
        return root
    root = tmp_path_factory.getbasetemp().parent / name
    failed = root.with_name(f"{name}.failed")
    with FileLock(f"{root}.lock"):
        if failed.is_file():
            pytest.fail(f"{name}: another test process failed to make it:\n{failed.read_text()}", pytrace=False)
        if not (root / "made").is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            try:
                make(root)
            except BaseException as err:
                failed.write_text(f"{type(err).__name__}: {err}"[-6000:])
                raise
            (root / "made").touch()
    return root


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory, mlflow_server) -> Path:
    """The tiny demo the training tests share, made once a run by the real stages (``manifest``, ``preprocess`` in
    this process, without Ray Data): ``raw/`` (15 clips), ``data/demo/`` (manifest, shards) and ``params.yaml``.
    Tests train on it in work folders of their own (``demo_workspace``); one that damages shards copies them."""
    return made_once(tmp_path_factory, "demo", lambda root: _make_demo_shards(root, mlflow_server))


def _make_demo_shards(root: Path, mlflow_server: MlflowServer) -> None:
    from pipeline import cli

    generate_demo(root / "raw", **DEMO_CLIPS)
    params = demo_params(root / "params.yaml", root, experiment="demo-shards", scaling={"preprocess_workers": 0})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HICMAE_WORKDIR", str(root))
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        for stage in ("manifest", "preprocess"):
            assert cli.main(["--params", str(params), stage, "--dataset", "demo"]) == 0, stage


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_shards) -> DemoRun:
    """The tiny demo's five stages end to end, eager, 2 Ray Train workers (tests/demo_run.py), once a test run (for
    all test processes: read it, do not change it): ``work`` its work folder, ``mlflow`` the store it logged to."""

    def make(root: Path) -> None:
        (root / "work").mkdir()
        (root / "work" / "raw").symlink_to(demo_shards / "raw")
        run_demo_pipeline(root / "work", root / "mlflow").save(root / "run.json")

    return DemoRun.load(made_once(tmp_path_factory, "e2e", make) / "run.json")


@pytest.fixture(scope="module")
def demo_run_mlflow(demo_run, tmp_path_factory) -> Iterator[MlflowServer]:
    """A server over a copy of the store that ``demo_run`` logged to (its own server's, which it stopped): its
    experiment ``e2e`` and runs, as any test process reads them."""
    folder = tmp_path_factory.mktemp("demo-run-mlflow")
    shutil.copytree(demo_run.mlflow, folder, dirs_exist_ok=True)
    with running_mlflow_server(folder) as server:
        yield server


CLASSES = ("neutral", "happy", "angry", "sad")  # the classes of ``random_classifier``


@pytest.fixture(scope="session")
def random_classifier(tmp_path_factory) -> Path:
    """An exported classifier of the test size with seeded random weights (``CLASSES``): for tests that count rows
    or compare prediction paths, not accuracy."""
    import torch

    from model import HiCMAEClassifier, get_config
    from pipeline.train.export import export_model
    from preprocessing.manifest import DatasetInfo

    torch.manual_seed(0)
    cfg = get_config("hicmae_test")
    info = DatasetInfo(name="mine", task="classification", classes=list(CLASSES))
    return export_model(HiCMAEClassifier(cfg, len(CLASSES)).state_dict(), cfg, info, {}, None,
                        tmp_path_factory.mktemp("exported") / "model-folder")


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """torch.compile's caches and counters emptied before and after the test (its graphs and breaks counted alone)."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def face_models() -> dict[str, str]:
    """Paths of the face-detector models by name (fetched once by scripts/setup.sh); skips where they are not
    available."""
    try:
        return {name: str(path) for name, path in ensure_face_models().items()}
    except RuntimeError as err:
        pytest.skip(f"face models not available: {err}")


@pytest.fixture
def hicmae(tmp_path) -> Callable[..., subprocess.CompletedProcess]:
    """Run the real command, ``python -m pipeline.cli ARGS``, as a user would, with ``HICMAE_WORKDIR`` (and an MLflow
    SQLite store) in this test's ``tmp_path``; the finished process, its output captured as text."""
    env = {**os.environ, "HICMAE_WORKDIR": str(tmp_path),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=Path(__file__).parents[1], env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run


WORKER_TITLE = "ray::RayTrainWorker"  # the process title of a Ray Train worker actor (then ".<method>")
REGISTERED = "checkpoint_manager_snapshot.json"  # in a Ray Train run's folder once it registered a checkpoint


class WorkerKiller(threading.Thread):
    """SIGKILL one Ray Train worker among ``processes()`` (not one that ran before) once ``ready()`` is true."""

    def __init__(self, processes: Callable[[], list[psutil.Process]], ready: Callable[[], bool]):
        super().__init__(daemon=True)
        self.processes, self.ready = processes, ready
        self.before = {p.pid for p in self.workers()}  # workers of earlier runs, if still around
        self.killed: int | None = None
        self.done = threading.Event()

    def workers(self) -> list[psutil.Process]:
        found = []
        for process in self.processes():
            try:
                # the actor's process, not its data-loader children (they inherit its title)
                if process.cmdline()[0].startswith(WORKER_TITLE) and process.name() != "pt_data_worker":
                    found.append(process)
            except (psutil.Error, IndexError):
                continue
        return found

    def run(self) -> None:
        while not self.done.wait(0.05):
            if not self.ready():
                continue
            workers = [p for p in self.workers() if p.pid not in self.before]
            if workers:
                workers[0].send_signal(signal.SIGKILL)
                self.killed = workers[0].pid
                return

    def __enter__(self) -> WorkerKiller:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()


@pytest.fixture
def kill_worker_after_checkpoint() -> Callable[..., WorkerKiller]:
    """``with kill_worker_after_checkpoint(processes, storage, runs=1) as killer: ...``: SIGKILLs one Ray Train
    worker among ``processes()`` once ``runs`` Ray Train runs under ``storage`` have registered a checkpoint;
    ``killer.killed`` is its pid (None if none was running by then)."""

    def make(processes: Callable[[], list[psutil.Process]], storage: Path, runs: int = 1) -> WorkerKiller:
        return WorkerKiller(processes, lambda: len(list(Path(storage).glob(f"**/{REGISTERED}"))) >= runs)

    return make
