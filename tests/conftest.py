"""Fixtures shared by the test modules (pytest finds them here; no test module imports another)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, running_mlflow_server

from preprocessing.face_model import ensure_face_model


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """One real ``mlflow server`` on loopback for the whole test run (tests/mlflow_server.py); tests point
    ``MLFLOW_TRACKING_URI`` at ``mlflow_server.url`` and read back through ``get`` / ``post``."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="session")
def face_model() -> str:
    """Path of the face-detector model (fetched once by scripts/setup.sh); skips where it is not available."""
    try:
        return str(ensure_face_model())
    except RuntimeError as err:
        pytest.skip(f"face model not available: {err}")


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
