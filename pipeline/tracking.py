"""MLflow tracking for the pipeline stages (called on rank 0 only).

    with start_stage_run("finetune", config, experiment="crema_d", run_name="fold1", data_hash=h) as run:
        log_metrics({"val": metrics}, step=epoch)
        log_table(rows, "predictions.csv")

Where runs go: ``MLFLOW_TRACKING_URI`` when set (a shared ``mlflow server`` on a cluster), otherwise the SQLite
file ``<project>/mlflow.db``. With a local store, artifacts of experiment ``<name>`` go to
``<project>/mlartifacts/<name>/<run id>/artifacts`` whatever the working directory; a server decides for itself.
Under DVC the project is ``$DVC_ROOT``, also for experiments that run in a temporary copy (``--temp``, queued).

Every stage run is tagged so that variants compare side by side in one MLflow experiment: ``variant`` (given by
the stage), and under ``dvc exp run`` the experiment's name, its baseline commit and the params it changed. The
variant and those changed params are params of the run as well, and a fold run has its stage run's params and its
``fold``: the UI's compare view plots and diffs params. What a run read (a dataset's shards, a checkpoint) are its
MLflow dataset inputs, the runs table's Dataset column. The experiment is tagged as model training and holds a
view of its runs table for comparing variants: ``runs_view_url`` links to it (and to the UI's model training side).

Training never waits on the tracking server. A ``RunLogger`` (what rank 0 of a Ray Train run logs with) only queues
its metrics, with the time they were logged; a daemon thread of the process delivers them in order, in batches, and
retries with a short timeout and back-off for as long as the run goes on (``metric_queue.MetricQueue``). An outage
is one console line when it begins and one when the queue caught up. Before a checkpoint the worker lets the queue
empty while the server takes metrics (``settle``, no wait during an outage), so a worker that dies leaves no gap. At
a run's end (``flush``, ``finish``) the queue gets a bounded time (``HICMAE_TRACKING_FLUSH_S``, 60 s); what the
server still has not taken then is written beside the stage's log (``logs/<stage>.mlflow-<run id>.jsonl``) and
delivered by the stage's end, or by the next stage that reaches the server (``deliver_spill``); a run whose span
could not be delivered says so in its tag ``tracking.missing_span``. A
stage whose server does not answer at its start fails at once with one line (``require_reachable``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import re
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

import mlflow
import numpy as np
import yaml
from mlflow.entities import Dataset, DatasetInput, InputTag, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.time import get_current_time_millis
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from preprocessing.errors import InputError
from preprocessing.fileio import sha256_file

from .console import console_log, current
from .layout import PROJECT_ROOT
from .metric_queue import (
    FLUSH_DEFAULT_S,
    SETTLE_S,
    MetricQueue,
    Point,
    deliver_leftovers,
    deliver_spill,
    failure_reason,
    flush_timeout_s,
    is_local_store,
    spill_path,
)
from .metrics import is_scalar

DATABASE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"  # model training
CONTEXT_TAG = "mlflow.data.context"  # how a run used a dataset input ("training", "init")
DIGEST_CHARS = 12  # of a dataset input's hash: tells datasets apart and fits the runs table's Dataset column
DEFINING_TAGS = ("variant", "params_changed")  # tags that are also params: what the compare view shows
RUNS_VIEW = "ablations"  # the runs table view that ensure_experiment registers (``runs_view_url``)
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW}"  # where the UI keeps a view that its Share button made
# The UI's GenAI / Model training switch: 3.17 opens every experiment as GenAI (its Overview, runs filed under
# "Evaluation runs") unless the link or the browser's last choice says otherwise, whatever the experiment's kind.
TRAINING_UI = "workflowType=machine_learning"
ENV_LOCK_FILE = "requirements.lock"  # every dependency's version (scripts/setup.sh, docker/Dockerfile)
HEALTH_TIMEOUT_S = 3.0  # a stage's check that its tracking server answers


def tracking_uri(project_root: str | Path = PROJECT_ROOT) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<absolute project root>/mlflow.db``.

    ``mlflow.set_tracking_uri`` (called by ``start_stage_run``) exports the choice to ``MLFLOW_TRACKING_URI``, so
    processes started afterwards (Ray workers) log to the same store.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(project_root).resolve() / DATABASE_FILE}"


def artifact_location(project_root: str | Path, experiment: str) -> str:
    """``file://<project>/mlartifacts/<experiment, made file-name safe>``."""
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (Path(project_root).resolve() / ARTIFACT_DIR / folder).as_uri()


def ensure_experiment(name: str, project_root: str | Path = PROJECT_ROOT) -> str:
    """The id of experiment ``name`` in the current tracking store, created (or restored) when needed.

    A local store gets the deterministic artifact location above; a server picks its own. The experiment is
    tagged as model training (``mlflow.experimentKind``, unless it has a kind already) and holds the UI's
    ``runs_view`` (opened by ``runs_view_url``).
    """
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = artifact_location(project_root, name) if is_local_store(mlflow.get_tracking_uri()) else None
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: TRAINING_KIND, RUNS_VIEW_TAG: runs_view()})
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before runs were tagged so
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    if experiment.tags.get(RUNS_VIEW_TAG) != runs_view():
        client.set_experiment_tag(experiment.experiment_id, RUNS_VIEW_TAG, runs_view())
    return experiment.experiment_id


def runs_view() -> str:
    """The UI's runs table for comparing variants, as the UI stores a shared view (JSON): the fine-tuning runs
    (their fold runs nested) with, first, their variant, the params it changed (``dvc exp run``), their datasets
    and the fold means of the test metrics.

    A column that no run has is not shown: classification gets UAR and WAR, regression mean CCC.
    """
    columns = [f"{kind}.`{key}`" for kind, key in (
        ("tags", "variant"), ("params", "params_changed"), ("attributes", "Dataset"),
        *(("metrics", f"test/{name}_mean") for name in ("uar", "war", "ccc_mean")))]
    return json.dumps({"searchFilter": "tags.dvc_stage = 'finetune'", "selectedColumns": columns,
                       "columnOrder": columns, "columnWidths": {"attributes.`Dataset`": 460}})


def runs_view_url(ui: str, experiment_id: str) -> str:
    """The link to experiment ``experiment_id``'s runs in the ``runs_view``, in the MLflow UI at ``ui``."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW}&{TRAINING_UI}"


def git_commit(project_root: str | Path = PROJECT_ROOT) -> str:
    """``git rev-parse HEAD`` of the project, or "unknown" outside a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root, capture_output=True, text=True,
                                timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def env_lock_hash(project_root: str | Path = PROJECT_ROOT) -> str:
    """sha256 of the project's ``requirements.lock`` (the pinned environment the code runs in), or "missing"."""
    try:
        return sha256_file(Path(project_root) / ENV_LOCK_FILE)
    except OSError:
        return "missing"


def store_root(project_root: str | Path = PROJECT_ROOT) -> Path:
    """The project whose local MLflow store a run uses: ``$DVC_ROOT`` when DVC runs the stage, else ``project_root``.

    Experiments run with ``dvc exp run --temp`` or from the queue execute in a copy under ``.dvc/tmp/exps`` that
    is deleted afterwards; DVC points ``DVC_ROOT`` at the project itself.
    """
    return Path(os.environ.get("DVC_ROOT") or project_root)


def changed_params(project_root: str | Path, rev: str) -> str:
    """``params.yaml`` against its version at git ``rev``: the changed values as "key=value, ..." ("" if none).

    Keys are dotted paths of the resolved YAML (merge keys applied); ``anchors`` is left out (read only through
    the sections that use it). "unknown" when git cannot show the file at ``rev``.
    """
    try:
        old_text = subprocess.run(["git", "show", f"{rev}:./params.yaml"], cwd=project_root, capture_output=True,
                                  text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    old = flatten(yaml.safe_load(old_text) or {})
    new = flatten(yaml.safe_load((Path(project_root) / "params.yaml").read_text()) or {})
    changed = [f"{key}={new.get(key)}" for key in sorted(old.keys() | new.keys())
               if not key.startswith("anchors.") and old.get(key) != new.get(key)]
    return ", ".join(changed)[:MAX_TAG_VAL_LENGTH]


def experiment_tags(project_root: str | Path = PROJECT_ROOT) -> dict[str, str]:
    """Under ``dvc exp run`` (which sets ``DVC_EXP_NAME`` and ``DVC_EXP_BASELINE_REV``): ``dvc_exp_name``,
    ``dvc_exp_baseline`` (the commit the experiment starts from) and ``params_changed`` against it; else {}."""
    name, baseline = os.environ.get("DVC_EXP_NAME"), os.environ.get("DVC_EXP_BASELINE_REV")
    if not (name and baseline):
        return {}
    return {"dvc_exp_name": name, "dvc_exp_baseline": baseline,
            "params_changed": changed_params(project_root, baseline)}


def _to_json(value):
    """``json.dumps`` fallback: numpy scalars and arrays as numbers and lists, anything else (paths) as str."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return str(value)


def plain(config) -> dict:
    """A config (dict or pydantic model) as JSON-compatible nested dicts; paths and other objects as strings."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    return json.loads(json.dumps(config, default=_to_json))


def flatten(nested: Mapping, sep: str = ".", prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and other values are kept as leaves."""
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, sep, name))
        else:
            flat[name] = value
    return flat


def config_params(config) -> dict[str, str]:
    """The config flattened to dotted keys, each value a string cut to MLflow's parameter length limit."""
    return {key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in flatten(plain(config)).items()}


def dataset_input(name: str, digest: str, source: str | Path, context: str,
                  profile: Mapping | None = None) -> DatasetInput:
    """What a run read, as an MLflow dataset input: ``name`` at ``digest`` (a hash, its first DIGEST_CHARS
    characters), from the local path ``source``, used as ``context`` ("training", "init"); ``profile``: its size.

    The UI shows it in the runs table's Dataset column and filters runs by it; the same name and digest is the same
    dataset across runs.
    """
    dataset = Dataset(name=name, digest=digest[:DIGEST_CHARS], source_type="local",
                      source=json.dumps({"uri": str(Path(source).resolve())}),
                      profile=json.dumps(dict(profile)) if profile else None)
    return DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, context)])


def file_input(name: str, path: str | Path, context: str) -> DatasetInput:
    """A file (a checkpoint) as a dataset input, its sha256 the digest."""
    return dataset_input(name, sha256_file(path), path, context, {"bytes": Path(path).stat().st_size})


def shards_input(name: str, folder: str | Path, shards: Sequence, data_hash: str) -> DatasetInput:
    """Dataset ``name``'s processed ``shards`` (the ``ShardIndex`` of each, in ``folder``) as a training input,
    digest ``data_hash`` (``data.shards_hash``)."""
    return dataset_input(name, data_hash, folder, "training",
                         {"shards": len(shards), "clips": sum(len(shard.samples) for shard in shards)})


def log_inputs(run_id: str, inputs: Sequence[DatasetInput]) -> None:
    """Add dataset inputs to a run (by id: any run, active or not)."""
    if inputs:
        mlflow.MlflowClient().log_inputs(run_id, datasets=list(inputs))


@contextlib.contextmanager
def start_stage_run(stage: str, config, experiment: str, run_name: str | None = None,
                    parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
                    data_hash: str | None = None, inputs: Sequence[DatasetInput] = (),
                    project_root: str | Path = PROJECT_ROOT) -> Iterator:
    """Start an MLflow run for one pipeline stage and yield it; it ends (FAILED on an exception) on exit.

    The run is nested under ``parent_run_id`` when given (e.g. a fold run under the stage run started by the
    driver), else under the run active in this process, if any. It logs ``config`` as dotted params and as the
    artifact ``config.yaml``, and tags ``dvc_stage``, ``git_commit`` (also ``mlflow.source.git.commit``),
    ``env.lock_sha256`` (``env_lock_hash`` of the running code's project: the environment it was installed with),
    ``data_hash`` when given (``data.shards_hash``), the ``experiment_tags`` and ``tags``; of those, the
    ``DEFINING_TAGS`` are params too. ``inputs`` (``dataset_input``): what it reads. On exit it delivers what its
    workers could not (``deliver_spill``) and logs the stage's log file (``console.stage_console``) as an artifact.

    A tracking server that does not answer is an ``InputError`` before anything else (``require_reachable``); a
    stage's own run first delivers the metrics that earlier runs left in the log folder (``deliver_leftovers``).
    """
    uri = tracking_uri(store_root(project_root))
    require_reachable(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(experiment, store_root(project_root))
    if parent_run_id is None and mlflow.active_run() is None:
        deliver_leftovers(uri)
    commit = git_commit(project_root)
    run_tags = {"dvc_stage": stage, "git_commit": commit, "mlflow.source.git.commit": commit,
                "env.lock_sha256": env_lock_hash(), **experiment_tags(project_root)}
    if data_hash is not None:
        run_tags["data_hash"] = data_hash
    run_tags.update({key: str(value) for key, value in (tags or {}).items()})
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id,
                          nested=mlflow.active_run() is not None, tags=run_tags) as run:
        defining = {key: run_tags[key][:MAX_PARAM_VAL_LENGTH] for key in DEFINING_TAGS if key in run_tags}
        mlflow.log_params({**config_params(config), **defining})
        log_inputs(run.info.run_id, inputs)
        mlflow.log_text(yaml.safe_dump(plain(config), sort_keys=False), "config.yaml")
        try:
            yield run
        finally:
            deliver_spill(spill_path(run.info.run_id))  # what its workers could not deliver before they ended
            log_file = console_log()
            if log_file is not None and log_file.is_file():  # the stage's log so far, failed or not
                mlflow.log_artifact(str(log_file))
    if uri.startswith(("http://", "https://")) and not parent_run_id:  # MLflow's own line is off (console.py)
        current().show(f"{stage}: MLflow run {uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run.info.run_id}"
                       f"?{TRAINING_UI}")


def log_metrics(metrics: Mapping, step: int | None = None) -> dict[str, float]:
    """Log the finite numbers of a (nested) metrics dict under ``/``-joined keys; returns what was logged.

    Lists (a confusion matrix), strings, None, NaN and infinities are skipped.
    """
    flat = {key: float(value) for key, value in flatten(metrics, sep="/").items() if is_scalar(value)}
    if flat:
        mlflow.log_metrics(flat, step=step)
    return flat


@contextlib.contextmanager
def _staged(artifact_file: str) -> Iterator[Path]:
    """A temporary local path named like ``artifact_file``, logged to its folder in the run on exit."""
    artifact = PurePosixPath(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / artifact.name
        yield local
        folder = str(artifact.parent)
        mlflow.log_artifact(str(local), artifact_path=None if folder == "." else folder)


def log_table(rows: list[Mapping], artifact_file: str) -> None:
    """Log rows of dicts as a CSV artifact; the columns are the keys in order of first appearance."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with _staged(artifact_file) as local, open(local, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def require_reachable(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """An ``InputError`` (one line, at once) when the tracking server at ``uri`` does not answer a GET of its
    ``/health``: a stage fails before any work rather than after MLflow's minutes of retries. Any HTTP answer (even
    an error: a proxy that wants credentials) or TLS handshake means it is there; local stores pass."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as err:
        if isinstance(getattr(err, "reason", err), ssl.SSLError):  # it answered: certificates are MLflow's business
            return
        raise InputError(f"MLflow tracking server {uri} cannot be reached ({failure_reason(err)}): start it, or unset "
                         f"MLFLOW_TRACKING_URI to track into {DATABASE_FILE}") from err


@dataclasses.dataclass
class RunLogger:
    """Logs metrics into one existing run by id, from any process (rank 0 of a Ray Train run); picklable. ``log``
    only queues them (a ``MetricQueue`` of the process that logs, made at its first point); ``flush`` (a worker, when
    its training is done) or ``finish`` (the driver) delivers what is left, waiting at most ``flush_timeout_s``.
    ``console``: where the queue's lines go (``report_to``); None: this process's stage console."""

    tracking_uri: str
    run_id: str
    spill_file: str | None = None  # where undelivered metrics go; None: ``spill_path`` where they are written
    flush_timeout_s: float = FLUSH_DEFAULT_S
    console: object = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self._queue: MetricQueue | None = None

    def __getstate__(self) -> dict:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}  # not the queue

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._queue = None

    def report_to(self, console) -> None:
        """Say what the queue has to say (tracking behind, caught up) through ``console`` (a worker's)."""
        self.console = console
        if self._queue is not None:
            self._queue.console = console

    def log(self, metrics: Mapping, step: int) -> None:
        """Queue the finite numbers of ``metrics`` (nested ones under ``/``-joined keys) at ``step``, stamped now."""
        flat = {k: float(v) for k, v in flatten(metrics, sep="/").items() if is_scalar(v)}
        now = get_current_time_millis()  # the charts' wall-time and relative-time axes: when logged, not delivered
        if flat:
            self._metric_queue().put([Point(key, value, now, step) for key, value in flat.items()])

    def log_epoch(self, metrics: Mapping, epoch: int) -> None:
        """An epoch's ``metrics`` (``epoch`` itself left out) at step ``epoch``."""
        self.log({k: v for k, v in metrics.items() if k != "epoch"}, epoch)

    def pending(self) -> int:
        """Metrics logged in this process and not delivered yet."""
        return self._queue.pending() if self._queue is not None else 0

    def settle(self) -> bool:
        """Before a checkpoint: the metrics logged so far delivered, if the server takes them (``MetricQueue.settle``:
        no wait during an outage). A worker that dies after the checkpoint then leaves no gap in the run."""
        return self._queue is None or self._queue.settle(SETTLE_S)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` (default ``flush_timeout_s``) seconds for the queued metrics to reach MLflow; True
        if they did. Else they are written beside the stage's log (``MetricQueue.flush``)."""
        if self._queue is None:
            return True
        return self._queue.flush(self.flush_timeout_s if timeout is None else timeout)

    def finish(self, metrics: Mapping | None = None, status: str = "FINISHED") -> None:
        """Log final ``metrics`` (step 0), deliver what is queued here and what the run's workers left
        (``deliver_spill``), and end the run with ``status``."""
        if metrics:
            self.log_epoch(metrics, 0)
        self.flush()
        deliver_spill(self._spill_file())
        mlflow.MlflowClient(self.tracking_uri).set_terminated(self.run_id, status)

    def _spill_file(self) -> Path:
        return Path(self.spill_file) if self.spill_file else spill_path(self.run_id)

    def _metric_queue(self) -> MetricQueue:
        if self._queue is None:
            self._queue = MetricQueue(self.tracking_uri, self.run_id, self._spill_file(), self.console)
        return self._queue


def run_logger(run) -> RunLogger:
    """A ``RunLogger`` for ``run`` (an mlflow Run) on the current tracking server, spilling beside this stage's log."""
    run_id = run.info.run_id
    return RunLogger(mlflow.get_tracking_uri(), run_id, str(spill_path(run_id)), flush_timeout_s())


def start_child_run(parent, run_name: str, tags: Mapping[str, str],
                    params: Mapping[str, object] | None = None) -> RunLogger:
    """A run nested under ``parent`` (an active mlflow Run) that other processes log into by id.

    It carries the parent's own tags (``variant``, the experiment's, ...), then ``tags``; the parent's params (its
    config, the variant), then ``params`` (the fold); and the parent's dataset inputs. So two fold runs of
    different variants compare in the UI as their stage runs do.
    """
    uri = mlflow.get_tracking_uri()
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent.info.run_id)  # with what it logged after it started
    inherited = {key: value for key, value in parent.data.tags.items() if not key.startswith("mlflow.")}
    run = client.create_run(parent.info.experiment_id, run_name=run_name,
                            tags={**inherited, "mlflow.parentRunId": parent.info.run_id, **tags})
    own = {**parent.data.params, **{key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in (params or {}).items()}}
    client.log_batch(run.info.run_id, params=[Param(key, value) for key, value in own.items()])
    if parent.inputs and parent.inputs.dataset_inputs:
        client.log_inputs(run.info.run_id, datasets=parent.inputs.dataset_inputs)
    return run_logger(run)
