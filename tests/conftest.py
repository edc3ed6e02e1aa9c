"""Fixtures shared by the test modules (pytest finds them here; no test module imports another)."""

from __future__ import annotations

from collections.abc import Iterator

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
