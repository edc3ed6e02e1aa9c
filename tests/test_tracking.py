"""Stage runs land in MLflow with their config, tags, metrics and artifacts: local SQLite store and real server.
Metrics logged from a worker travel through a queue that outlives an outage of the server (its process killed and
started again) and keeps at a run's end what the server does not take in time."""

import hashlib
import json
import math
import os
import pickle
import re
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.utils.time import get_current_time_millis
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from mlflow_server import free_port

from pipeline import metric_queue, tracking
from pipeline.console import stage_console
from pipeline.layout import PROJECT_ROOT
from pipeline.plots import confusion_matrix_figure, save_figure
from pipeline.tracking import (
    artifact_location,
    config_params,
    ensure_experiment,
    flatten,
    git_commit,
    log_metrics,
    log_table,
    start_child_run,
    start_stage_run,
    tracking_uri,
)
from preprocessing.errors import InputError

# mlflow's SQLAlchemy store uses a loader option that SQLAlchemy 2 deprecates; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")

CONFIG = {
    "dataset": {"name": "demo", "fold": 1, "root": "data/demo"},
    "optim": {"lr": 5e-4, "betas": [0.9, 0.999]},
    "notes": "x" * (MAX_PARAM_VAL_LENGTH + 50),
}


@pytest.fixture
def mlflow_state():
    """Restore MLflow's global tracking URI (which it also exports to the environment) after a test."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    mlflow.set_tracking_uri(None)
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git checkout with one commit, shared by the module's tests; returns (root, commit)."""
    root = tmp_path_factory.mktemp("project")
    git = ["git", "-C", str(root), "-c", "user.name=test", "-c", "user.email=test@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    return root, commit


def log_stage_with_fold(root, experiment):
    """A stage run with one nested fold run that logs metrics, a figure and a table; returns both runs."""
    data_hash = "0f" * 32
    with start_stage_run("finetune", CONFIG, experiment, run_name="stage", data_hash=data_hash,
                         tags={"dataset": "demo"}, project_root=root) as stage:
        log_metrics({"test": {"uar_mean": 0.5}})
        with start_stage_run("finetune", {"fold": 1}, experiment, run_name="fold1", project_root=root) as fold:
            for epoch, uar in enumerate([0.3, 0.45]):
                logged = log_metrics({"val": {"uar": uar, "confusion_matrix": [[1, 0], [0, 1]]},
                                      "train/loss": math.nan, "note": "text"}, step=epoch)
            figure = save_figure(confusion_matrix_figure([[3, 1], [0, 4]], ["a", "b"]), root / "confusion.png")
            mlflow.log_artifact(str(figure), "plots")  # as the stages log their figures
            log_table([{"clip": "a", "pred": 0}, {"clip": "b", "pred": 1, "prob": 0.7}], "predictions.csv")
    assert logged == {"val/uar": 0.45}  # NaN, lists and strings are skipped
    return stage, fold


def test_flatten_and_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    params = config_params(CONFIG)
    assert params["optim.lr"] == "0.0005"
    assert params["optim.betas"] == "[0.9, 0.999]"
    assert len(params["notes"]) == MAX_PARAM_VAL_LENGTH


def test_tracking_uri_default_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    expected = (tmp_path.resolve() / "mlartifacts" / "crema-d_fold_1").as_uri()
    assert artifact_location(tmp_path, "crema-d / fold 1") == expected


def test_git_commit_outside_a_checkout(tmp_path):
    assert git_commit(tmp_path) == "unknown"


def test_local_store(project, tmp_path, mlflow_state, monkeypatch):
    root, commit = project
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the store and artifacts must not depend on the working directory
    stage, fold = log_stage_with_fold(root, "demo finetune")

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    stage_run, fold_run = client.get_run(stage.info.run_id), client.get_run(fold.info.run_id)
    assert stage_run.info.status == fold_run.info.status == "FINISHED"
    assert stage_run.data.params["dataset.fold"] == "1"
    assert stage_run.data.params["optim.lr"] == "0.0005"
    tags = stage_run.data.tags
    assert tags["git_commit"] == tags["mlflow.source.git.commit"] == commit
    assert tags["dvc_stage"] == "finetune" and tags["dataset"] == "demo"
    assert tags["data_hash"] == "0f" * 32
    assert fold_run.data.tags["mlflow.parentRunId"] == stage.info.run_id
    assert fold_run.data.metrics == {"val/uar": 0.45}
    assert [m.value for m in client.get_metric_history(fold.info.run_id, "val/uar")] == [0.3, 0.45]

    assert fold_run.info.artifact_uri.startswith((root / "mlartifacts" / "demo_finetune").as_uri())
    assert {a.path for a in client.list_artifacts(fold.info.run_id)} == {
        "config.yaml", "plots", "predictions.csv"}
    config = yaml.safe_load(open(client.download_artifacts(stage.info.run_id, "config.yaml", str(tmp_path))))
    assert config["optim"] == CONFIG["optim"]
    table = open(client.download_artifacts(fold.info.run_id, "predictions.csv", str(tmp_path))).read()
    assert table.splitlines() == ["clip,pred,prob", "a,0,", "b,1,0.7"]
    assert not list(elsewhere.iterdir())


def test_explicit_parent_and_failed_run(project, mlflow_state):
    """A run started elsewhere (e.g. a Ray worker) nests under a given parent; an exception marks it FAILED."""
    root, _ = project
    with start_stage_run("pretrain", {}, "demo", run_name="driver", project_root=root) as driver:
        pass
    with pytest.raises(RuntimeError), start_stage_run("pretrain", {}, "demo", parent_run_id=driver.info.run_id,
                                                      project_root=root) as worker:
        raise RuntimeError("worker died")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root))
    run = client.get_run(worker.info.run_id)
    assert run.data.tags["mlflow.parentRunId"] == driver.info.run_id
    assert run.info.status == "FAILED"


def test_server(mlflow_server, project, mlflow_state, monkeypatch):
    root, commit = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    stage, fold = log_stage_with_fold(root, "demo-server")
    image = save_figure(confusion_matrix_figure([[1, 0], [0, 1]], ["a", "b"]), root / "cm.png")
    with start_stage_run("report", {}, "demo-server", run_name="report", project_root=root):
        mlflow.log_artifact(str(image), "plots")

    experiment_id = mlflow_server.get("experiments/get-by-name", experiment_name="demo-server")["experiment"][
        "experiment_id"]
    runs = mlflow_server.post("runs/search", {"experiment_ids": [experiment_id]})["runs"]
    by_name = {run["info"]["run_name"]: run for run in runs}
    assert set(by_name) == {"stage", "fold1", "report"}

    def values(run, field):
        return {item["key"]: item["value"] for item in run["data"].get(field, [])}

    stage_run, fold_run = by_name["stage"], by_name["fold1"]
    assert values(stage_run, "params")["optim.betas"] == "[0.9, 0.999]"
    assert values(stage_run, "tags")["git_commit"] == commit
    lock = hashlib.sha256((PROJECT_ROOT / "requirements.lock").read_bytes()).hexdigest()
    assert values(stage_run, "tags")["env.lock_sha256"] == lock  # the checkout's lock, whatever project_root
    assert values(stage_run, "tags")["dvc_stage"] == "finetune"
    assert values(fold_run, "tags")["mlflow.parentRunId"] == stage.info.run_id
    assert values(fold_run, "metrics") == {"val/uar": 0.45}
    assert values(stage_run, "metrics") == {"test/uar_mean": 0.5}

    listing = mlflow_server.get("artifacts/list", run_id=fold.info.run_id)["files"]
    assert {f["path"] for f in listing} == {"config.yaml", "plots", "predictions.csv"}
    plots = mlflow_server.get("artifacts/list", run_id=fold.info.run_id, path="plots")["files"]
    assert [f["path"] for f in plots] == ["plots/confusion.png"] and plots[0]["file_size"] > 5_000
    report_plots = mlflow_server.get("artifacts/list", run_id=by_name["report"]["info"]["run_id"], path="plots")
    assert [f["file_size"] for f in report_plots["files"]] == [image.stat().st_size]
    assert list((mlflow_server.folder / "artifacts").rglob("config.yaml"))  # stored by the server, not locally
    assert not (root / "mlartifacts" / "demo-server").exists()


def test_variant_runs_compare(project, tmp_path, mlflow_state, monkeypatch):
    """What the UI compares: a stage run's dataset inputs and defining params, its fold run's copy of both with the
    fold, metrics logged from elsewhere at the time they were logged, and the experiment marked as training."""
    root, commit = project
    monkeypatch.setenv("DVC_EXP_NAME", "last_layer")  # under `dvc exp run`; git has no params.yaml to diff here
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", commit)
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"pre-trained weights")
    inputs = [tracking.dataset_input("demo", "ab" * 32, tmp_path / "processed", "training", {"clips": 15}),
              tracking.file_input("runs/pretrain/checkpoint.pt", checkpoint, "init")]
    config = {"epochs": 2, "model": {"size": "hicmae_test", "overrides": {"feature_fusion": "last"}}}
    began = time.time() * 1000
    with start_stage_run("finetune", config, "variants", run_name="finetune-demo", inputs=inputs,
                         tags={"variant": "last_layer"}, project_root=root) as stage:
        fold = start_child_run(stage, "demo-fold1", {"fold": "1"}, params={"fold": 1})
        fold.log({"train_step/loss": 1.25}, step=3)
        fold.finish({"test": {"war": 0.5}})
    ended = time.time() * 1000

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root))
    stage_run, fold_run = client.get_run(stage.info.run_id), client.get_run(fold.run_id)
    expected_params = {"epochs": "2", "model.size": "hicmae_test", "model.overrides.feature_fusion": "last",
                       "variant": "last_layer", "params_changed": "unknown"}
    assert stage_run.data.params == expected_params
    assert fold_run.data.params == {**expected_params, "fold": "1"}
    weights = hashlib.sha256(b"pre-trained weights").hexdigest()[:tracking.DIGEST_CHARS]
    for run in (stage_run, fold_run):
        found = {(item.dataset.name, item.dataset.digest, item.dataset.source_type,
                  json.loads(item.dataset.source)["uri"], tuple((t.key, t.value) for t in item.tags))
                 for item in run.inputs.dataset_inputs}
        assert found == {("demo", "abababababab", "local", str(tmp_path / "processed"),
                          (("mlflow.data.context", "training"),)),
                         ("runs/pretrain/checkpoint.pt", weights, "local", str(checkpoint),
                          (("mlflow.data.context", "init"),))}, run.info.run_name
    points = [*client.get_metric_history(fold.run_id, "train_step/loss"),
              *client.get_metric_history(fold.run_id, "test/war")]
    assert [(point.step, point.value) for point in points] == [(3, 1.25), (0, 0.5)]
    assert all(began <= point.timestamp <= ended for point in points), points  # not 0: the charts' time axes

    tags = client.get_experiment(stage.info.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags[f"mlflow.sharedViewState.{tracking.RUNS_VIEW}"])
    assert {"attributes.`Dataset`", "tags.`variant`", "params.`params_changed`"} <= set(view["selectedColumns"])
    url = tracking.runs_view_url("http://127.0.0.1:5000/", stage.info.experiment_id)
    assert url == (f"http://127.0.0.1:5000/#/experiments/{stage.info.experiment_id}/runs"
                   "?viewStateShareKey=ablations&workflowType=machine_learning")


def test_an_older_experiment_gets_the_training_kind_and_the_view(project, mlflow_state):
    """An experiment made before (or by hand) is marked when a stage next uses it; a kind set by hand is kept."""
    root, _ = project
    mlflow.set_tracking_uri(tracking_uri(root))
    client = mlflow.MlflowClient()
    older = client.create_experiment("older")
    by_hand = client.create_experiment("by hand", tags={"mlflow.experimentKind": "finetuning"})
    assert ensure_experiment("older", root) == older and ensure_experiment("by hand", root) == by_hand
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(by_hand).tags["mlflow.experimentKind"] == "finetuning"
    for experiment in (older, by_hand):
        assert client.get_experiment(experiment).tags[tracking.RUNS_VIEW_TAG] == tracking.runs_view()


class Lines:
    """A console that keeps its lines (what a worker's console would send to the stage)."""

    def __init__(self):
        self.lines: list[str] = []

    def show(self, text: str) -> None:
        self.lines.append(text)

    def matching(self, pattern: str) -> list[str]:
        return [line for line in self.lines if re.search(pattern, line)]


@pytest.fixture
def server(mlflow_server):
    """The session's server, running again after the test whatever the test did to it."""
    yield mlflow_server
    if mlflow_server.process is None:
        mlflow_server.start()


@pytest.fixture
def sent(monkeypatch) -> list[tuple[str, list[metric_queue.Point]]]:
    """Every batch of points the queues delivered, by run, in the order the server took them."""
    batches, send = [], metric_queue.send_metrics

    def send_and_record(uri, run_id, points):
        send(uri, run_id, points)
        batches.append((run_id, list(points)))

    monkeypatch.setattr(metric_queue, "send_metrics", send_and_record)
    return batches


def delivered(sent, run_id: str) -> list[tuple[int, str]]:
    """(step, key) of the points delivered into run ``run_id``, in the order the server took them."""
    return [(point.step, point.key) for run, batch in sent if run == run_id for point in batch]


def new_run(server, tmp_path) -> tracking.RunLogger:
    """A fresh run on ``server`` and a logger for it that spills into ``tmp_path/logs``."""
    client = mlflow.MlflowClient(server.url)
    experiment = client.get_experiment_by_name("queue")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("queue")
    run_id = client.create_run(experiment_id).info.run_id
    return tracking.RunLogger(server.url, run_id, str(tmp_path / "logs" / f"pretrain.mlflow-{run_id}.jsonl"), 30.0)


def log_steps(logger: tracking.RunLogger, steps, pause: float = 0.0) -> dict[int, tuple[int, int]]:
    """Log two step metrics at each of ``steps``; returns each step's time window (ms) around its ``log`` call, and
    fails if a call took more than 50 ms (it only queues)."""
    windows = {}
    for step in steps:
        began = get_current_time_millis()
        logger.log({"train_step": {"loss": 1.0 / step, "lr": 0.1}}, step)
        ended = get_current_time_millis()
        assert ended - began < 50, f"log took {ended - began} ms at step {step}"
        windows[step] = (began, ended)
        time.sleep(pause)
    return windows


def history(server, run_id: str, key: str = "train_step/loss") -> list[dict]:
    points = server.get("metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
    return sorted(points, key=lambda point: point["step"])


def assert_arrived(server, run_id: str, windows: dict[int, tuple[int, int]]) -> None:
    """Every logged step of both metrics is in the run, stamped with the time it was logged."""
    for key in ("train_step/loss", "train_step/lr"):
        points = history(server, run_id, key)
        assert [point["step"] for point in points] == sorted(windows), key
        for point in points:
            began, ended = windows[point["step"]]
            assert began <= int(point["timestamp"]) <= ended, (key, point, windows[point["step"]])
    assert history(server, run_id)[-1]["value"] == pytest.approx(1.0 / max(windows))


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_logged_metrics_arrive_in_order_with_the_time_they_were_logged(server, tmp_path, sent):
    logger = new_run(server, tmp_path)
    lines = Lines()
    logger.report_to(lines)
    windows = log_steps(logger, range(1, 41))
    assert logger.flush(30) and logger.pending() == 0
    assert_arrived(server, logger.run_id, windows)
    assert delivered(sent, logger.run_id) == [
        (step, key) for step in range(1, 41) for key in ("train_step/loss", "train_step/lr")]
    assert lines.lines == [] and not os.path.exists(logger.spill_file)

    clone = pickle.loads(pickle.dumps(logger))  # as it travels to rank 0 of a Ray Train run: without its queue
    assert clone == logger and clone.pending() == 0 and clone.flush(0)


def test_an_outage_delays_the_metrics_not_the_logging(server, tmp_path, sent, capfd):
    """The server's processes are killed. A run that goes on logs at its pace; the console hears once that tracking
    is behind and once that it caught up, and after the restart every point arrives, in order, with its own time. A
    run that ends meanwhile waits the time it is given, then keeps its points in a file, delivered later."""
    going_on, ending = new_run(server, tmp_path), new_run(server, tmp_path)
    lines, ending_lines = Lines(), Lines()
    going_on.report_to(lines)
    ending.report_to(ending_lines)
    windows, ending_windows = log_steps(going_on, [1]), log_steps(ending, [1])
    assert going_on.flush(30) and ending.flush(30)
    spill = tmp_path / "logs" / f"pretrain.mlflow-{ending.run_id}.jsonl"
    server.stop(signal.SIGKILL)
    down = time.strftime("%H:%M:%S")
    try:
        ending_windows |= log_steps(ending, range(2, 7))
        began = time.monotonic()
        assert not ending.flush(1.0)
        assert time.monotonic() - began < 2.0 and ending.pending() == 0  # bounded by the timeout asked for
        windows |= log_steps(going_on, range(2, 22), pause=0.1)
        wait_for(lambda: lines.matching("unreachable"), timeout=10)
        assert going_on.pending() == 2 * 20  # nothing lost, nothing sent
        assert not metric_queue.deliver_spill(spill) and spill.exists()  # still away: kept, and said so
        assert f"10 metrics of run {ending.run_id} (steps 2-6, " in capfd.readouterr().out
    finally:
        server.start()
    assert going_on.flush(60)
    assert_arrived(server, going_on.run_id, windows)
    [behind] = lines.matching("unreachable")
    match = re.fullmatch(rf"tracking: MLflow server {server.url} unreachable since (\S+) \(connection refused\); "
                         r"(\d+) metrics queued, training goes on", behind)
    assert match and match.group(1) >= down and 1 <= int(match.group(2)) <= 40, behind
    assert lines.lines == [behind, f"tracking: MLflow server {server.url} is back; the 40 metrics queued since "
                                   f"{match.group(1)} are delivered"]
    assert delivered(sent, going_on.run_id) == [
        (step, key) for step in range(1, 22) for key in ("train_step/loss", "train_step/lr")]
    assert not any(name.startswith("MLFLOW_HTTP_REQUEST") for name in os.environ)  # the driver's calls as they were

    header, points = metric_queue.read_spill(spill)
    assert header == {"tracking_uri": server.url, "run_id": ending.run_id}
    assert [(point.step, point.key) for point in points] == [
        (step, key) for step in range(2, 7) for key in ("train_step/loss", "train_step/lr")]
    [kept] = ending_lines.matching("kept in")
    assert kept.startswith(f"tracking: MLflow server {server.url} did not take 10 metrics of run {ending.run_id} "
                           "(steps 2-6, ") and f"within 1 s at the run's end; kept in {spill}" in kept, kept
    assert metric_queue.deliver_spill(spill) and not spill.exists()
    assert_arrived(server, ending.run_id, ending_windows)
    assert f"delivered to MLflow from {spill}" in capfd.readouterr().out
    tags = {tag["key"] for tag in server.get("runs/get", run_id=ending.run_id)["run"]["data"].get("tags", [])}
    assert metric_queue.MISSING_SPAN_TAG not in tags


@pytest.mark.parametrize(("error", "reason"), [
    ("HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch "
     "(Caused by NewConnectionError('Failed to establish a new connection: [Errno 111] Connection refused'))",
     "connection refused"),
    # the server killed while it answered: urllib3's words for a response cut short
    ("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with exception ('Connection broken: "
     "IncompleteRead(0 bytes read, 2 more expected)', IncompleteRead(0 bytes read, 2 more expected))",
     "connection closed"),
    ("('Connection aborted.', RemoteDisconnected('Remote end closed connection without response'))",
     "connection closed"),
    ("('Connection aborted.', ConnectionResetError(104, 'Connection reset by peer'))", "connection reset"),
    ("HTTPConnectionPool(host='127.0.0.1', port=5000): Read timed out. (read timeout=5)", "timed out"),
    ("Failed to resolve 'tracking.example' ([Errno -2] Name or service not known)", "unknown host"),
])
def test_a_failed_request_is_named_in_a_few_words(error, reason):
    assert metric_queue.failure_reason(ConnectionError(error)) == reason


def test_a_refused_batch_is_kept_aside_and_the_run_names_the_missing_span(server, tmp_path, capfd):
    """A point the server refuses (a key it does not accept) does not hold up the queue; it waits in the file, and a
    run whose points cannot be delivered says which ones in its tag."""
    logger = new_run(server, tmp_path)
    lines = Lines()
    logger.report_to(lines)
    logger.log({"loss": 1.0}, 1)
    assert logger.flush(30)
    before = get_current_time_millis()
    logger.log({"loss?": 2.0}, 2)
    assert logger.flush(30)
    logger.log({"loss": 3.0}, 3)
    assert logger.flush(30)
    assert [point["step"] for point in history(server, logger.run_id, "loss")] == [1, 3]
    spill = tmp_path / "logs" / f"pretrain.mlflow-{logger.run_id}.jsonl"
    assert [(point.key, point.step) for point in metric_queue.read_spill(spill)[1]] == [("loss?", 2)]
    assert lines.matching(r"^tracking: MLflow refused 1 metrics of run \S+ \(steps 2-2, ") and f"kept in {spill}" in \
        lines.lines[-1]

    assert not metric_queue.deliver_spill(spill) and spill.exists()
    tags = {tag["key"]: tag["value"] for tag in server.get("runs/get", run_id=logger.run_id)["run"]["data"]["tags"]}
    span = json.loads(tags[metric_queue.MISSING_SPAN_TAG])
    logged = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(before / 1000))
    assert span == {"first_step": 2, "last_step": 2, "first_time": span["first_time"], "last_time": span["first_time"],
                    "metrics": 1, "file": str(spill)} and span["first_time"] >= logged
    assert "are still not in MLflow" in capfd.readouterr().out


def test_the_stage_run_delivers_what_its_workers_left(server, project, tmp_path, mlflow_state, monkeypatch):
    """A stage run's end delivers the points its workers spilled; a later stage run delivers those that earlier runs
    on the same server left in the log folder."""
    root, _ = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("HICMAE_WORKDIR", str(tmp_path))
    stamp = get_current_time_millis() - 60_000
    points = [metric_queue.Point("train_step/loss", 0.5, stamp + step, step) for step in (1, 2)]
    elsewhere = metric_queue.Point("train_step/loss", 0.25, stamp, 1)
    with stage_console(tmp_path / "logs" / "pretrain.log", "pretrain"):
        with start_stage_run("pretrain", {}, "spilled", run_name="earlier", project_root=root) as earlier:
            logger = tracking.run_logger(earlier)
            assert logger.spill_file == str(tmp_path / "logs" / f"pretrain.mlflow-{earlier.info.run_id}.jsonl")
            metric_queue.write_spill(Path(logger.spill_file), server.url, earlier.info.run_id, points)  # as a worker
            with open(logger.spill_file, "a") as spill:
                spill.write('{"key": "train_step/loss", "val')  # a worker killed while it wrote: left out
        assert not os.path.exists(logger.spill_file)
        left = tmp_path / "logs" / "finetune-demo.mlflow-left.jsonl"
        metric_queue.write_spill(left, server.url, earlier.info.run_id, [elsewhere])
        other = tmp_path / "logs" / "finetune-demo.mlflow-other.jsonl"
        metric_queue.write_spill(other, "http://127.0.0.1:1", earlier.info.run_id, [elsewhere])  # another server's
        with start_stage_run("pretrain", {}, "spilled", run_name="later", project_root=root):
            assert not left.exists() and other.exists()
    stored = [(point["step"], point["value"], int(point["timestamp"]))
              for point in history(server, earlier.info.run_id)]
    assert sorted(stored) == sorted([(1, 0.5, stamp + 1), (2, 0.5, stamp + 2), (1, 0.25, stamp)])


def test_a_server_nobody_answers_stops_the_stage_at_once(server, project, mlflow_state, monkeypatch):
    root, _ = project
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    began = time.monotonic()
    with pytest.raises(InputError) as raised, start_stage_run("pretrain", {}, "unreachable", project_root=root):
        pytest.fail("the stage ran without its tracking server")
    assert time.monotonic() - began < 5
    assert str(raised.value) == (f"MLflow tracking server {url} cannot be reached (connection refused): start it, or "
                                 "unset MLFLOW_TRACKING_URI to track into mlflow.db")
    tracking.require_reachable(server.url)  # one that answers passes
    tracking.require_reachable(f"sqlite:///{root}/mlflow.db")  # and so does a local store
