"""Exported models in MLflow's Model Registry: logged as pyfunc models, registered, and fetched back.

    hicmae-<dataset>            one version per fine-tuned fold, tagged with its fold, variant and data hash;
                                the alias ``best`` names the fold with the best validation score
    hicmae-pretrain-<dataset>   one version per pre-training run

A version is an MLflow pyfunc model (``pipeline/predict/pyfunc.py``, logged as code) that carries the exported folder
(``pipeline.train.export``) as its artifact ``model``: loading it needs the folder alone, not the run's outputs.

    model = mlflow.pyfunc.load_model("models:/hicmae-demo@best")
    rows = model.predict(pandas.DataFrame({"path": ["clip.mp4"]}))     # the rows `hicmae predict` writes

``local_model`` turns such a URI into the exported folder on this machine (MLflow's own download, once per version,
into the work root's cache): ``hicmae predict --model models:/hicmae-demo@best`` and ``hicmae verify`` use it.

Registration never fails a stage: a tracking server that does not answer (``tracking.require_reachable``) or a store
that cannot register is one console line, and the stage goes on (``register_quietly``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.store.artifact.utils.models import get_model_name_and_version

from preprocessing.errors import InputError

from . import tracking
from .console import current
from .layout import PROJECT_ROOT, Layout
from .metric_queue import failure_reason

PREFIX = "models:/"          # a registered model's URI: models:/<name>@<alias> or models:/<name>/<version>
BEST_ALIAS = "best"          # the fold chosen on validation, of a dataset's newest fine-tuning run
MODEL_ARTIFACT = "model"     # the pyfunc's artifact: the exported folder
LOGGED_NAME = "model"        # the logged model's name in its run
PYFUNC_CODE = Path(__file__).resolve().parent / "predict" / "pyfunc.py"  # logged as code: imported on loading only


def registered_name(dataset: str, pretrained: bool = False) -> str:
    """``hicmae-<dataset>`` (fine-tuned folds) or ``hicmae-pretrain-<dataset>``."""
    return f"hicmae-pretrain-{dataset}" if pretrained else f"hicmae-{dataset}"


def is_registered(source) -> bool:
    """Whether a model source is a registered model's URI (``models:/...``)."""
    return isinstance(source, str) and source.startswith(PREFIX)


def requirements() -> list[str]:
    """The logged model's pip requirements: the project's lock file (every package pinned) and torch, which the lock
    leaves to the set-up (CPU or CUDA build)."""
    lock = PROJECT_ROOT / tracking.ENV_LOCK_FILE
    torch = f"torch=={metadata.version('torch').split('+')[0]}"
    return [f"-r {lock}", torch] if lock.is_file() else [torch]


def log_exported(folder: str | Path, name: str, tags: Mapping[str, object]) -> ModelVersion:
    """Log the exported model ``folder`` as a pyfunc model in the active run, its signature from the pyfunc's type
    hints, and register it as a new version of ``name`` with ``tags``; the version. (The client's calls, not
    ``mlflow.register_model``, which prints its own lines to stderr.)"""
    logged = mlflow.pyfunc.log_model(name=LOGGED_NAME, python_model=str(PYFUNC_CODE),
                                     artifacts={MODEL_ARTIFACT: str(folder)}, pip_requirements=requirements())
    client = mlflow.MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return client.create_model_version(name, logged.model_uri, run_id=logged.run_id, model_id=logged.model_id,
                                       tags={key: str(value) for key, value in tags.items()})


def best_fold(scores: Mapping[int, float]) -> int:
    """The fold with the highest validation score (the lowest fold among equals).

    Chosen on the validation split carved from each fold's training folds, never on the test fold: the test metrics
    are the estimate of how a chosen model does on unseen speakers, and choosing on them would leak the test set into
    the choice (the estimate would be biased upwards). Under ``protocol: reference`` the validation split is the
    test fold itself, as the reference's own choice of epoch is."""
    return min(scores, key=lambda fold: (-scores[fold], fold))


def set_alias(version: ModelVersion, alias: str = BEST_ALIAS) -> None:
    """Point ``<its name>@alias`` at ``version`` (moved from any version it named before)."""
    mlflow.MlflowClient().set_registered_model_alias(version.name, alias, version.version)


def register_quietly(label: str, register: Callable[[], object]):
    """``register()``'s result, or None with one console line (``<label>: not registered in MLflow's Model Registry
    (<why>)``) when the tracking server does not answer or the store cannot register: the stage's outputs are
    written, and a registry is not among them."""
    try:
        tracking.require_reachable(mlflow.get_tracking_uri())
        return register()
    except (MlflowException, InputError, OSError) as err:  # requests' errors are OSErrors
        current().show(f"{label}: not registered in MLflow's Model Registry ({failure_reason(err)}); the exported "
                       "models are in runs/ as before")
        return None


def register_folds(dataset: str, folds: Mapping[int, tuple[str, Path, float]], tags: Mapping[str, object]) -> dict:
    """Register each fine-tuned fold's exported model as a version of ``hicmae-<dataset>``, logged in the fold's own
    run, and point the alias ``best`` at the fold of ``best_fold``. ``folds``: fold -> (its MLflow run id, its
    exported folder, its validation score); ``tags``: the versions' tags besides ``fold`` and ``validation_score``.
    Returns the versions by fold ({} when nothing could be registered: ``register_quietly``)."""
    name = registered_name(dataset)

    def register() -> dict[int, ModelVersion]:
        versions = {}
        for fold, (run_id, folder, score) in sorted(folds.items()):
            with mlflow.start_run(run_id=run_id, nested=True):
                versions[fold] = log_exported(folder, name, {**tags, "fold": fold, "validation_score": score})
        best = best_fold({fold: score for fold, (_, _, score) in folds.items()})
        set_alias(versions[best])
        current().show(f"finetune {dataset}: registered {name} versions "
                       f"{', '.join(f'{versions[f].version} (fold {f})' for f in sorted(versions))}; "
                       f"{name}@{BEST_ALIAS} -> fold {best}, chosen on validation")
        return versions

    return (register_quietly(f"finetune {dataset}", register) or {}) if folds else {}


def register_pretrained(dataset: str, folder: Path, tags: Mapping[str, object]) -> ModelVersion | None:
    """Register pre-training's exported model as a version of ``hicmae-pretrain-<dataset>``, logged in the active
    (pre-training) run; None when it could not be (``register_quietly``)."""
    name = registered_name(dataset, pretrained=True)

    def register() -> ModelVersion:
        version = log_exported(folder, name, tags)
        current().show(f"pretrain {dataset}: registered {name} version {version.version}")
        return version

    return register_quietly(f"pretrain {dataset}", register)


def logged_model_id(version: ModelVersion) -> str:
    """The id of the logged model a version points at (``m-...``: unique across tracking stores); for a version
    registered from a run's artifacts (``runs:/`` source), its name, number and run id."""
    if version.model_id:
        return version.model_id
    if version.source and version.source.startswith(f"{PREFIX}m-"):
        return version.source.removeprefix(PREFIX)
    return f"{version.name}-{version.version}-{version.run_id}"


def local_model(uri: str) -> Path:
    """The exported folder of a registered model, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``, on this
    machine: the version downloaded with MLflow's own download (once: a version never changes, and the work root's
    cache keeps it by its logged model's id) and the folder its pyfunc carries as the artifact ``model``. A ValueError
    names a URI that MLflow cannot resolve."""
    store = tracking.tracking_uri(tracking.store_root())  # MLFLOW_TRACKING_URI (mlflow.set_tracking_uri sets it too)
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    try:
        name, version = get_model_name_and_version(client, uri)
        logged = logged_model_id(client.get_model_version(name, version))
    except MlflowException as err:
        raise ValueError(f"{uri}: not a registered model in {store} ({str(err).splitlines()[0]})") from err
    folder = Layout.current().registered_model(logged)
    if not (folder / "MLmodel").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        download = Path(tempfile.mkdtemp(prefix=f".{logged}-", dir=folder.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"{PREFIX}{name}/{version}", dst_path=str(download),
                                                tracking_uri=store, registry_uri=store)
            os.replace(download, folder)
        finally:
            shutil.rmtree(download, ignore_errors=True)
    artifacts = Model.load(str(folder)).flavors.get("python_function", {}).get("artifacts") or {}
    if MODEL_ARTIFACT not in artifacts:
        raise ValueError(f"{uri}: version {version} of {name} carries no exported model (artifact "
                         f"{MODEL_ARTIFACT!r}); was it registered by this pipeline?")
    return folder / artifacts[MODEL_ARTIFACT]["path"]
