"""Stage runs land in MLflow with their config, tags, metrics and artifacts: local SQLite store and real server."""

import hashlib
import json
import math
import os
import subprocess
import time

import mlflow
import pytest
import yaml
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from pipeline import tracking
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
