"""The deployment files in docker/: linted and checked against the project (no container engine is needed).

hadolint lints the Dockerfile, the compose file is validated against the Compose Specification schema, and the
image's pinned dependencies must satisfy pyproject.toml, so that the image cannot silently drift from it.
"""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it is a dev dependency (pip install -e '.[dev]')")
    return path


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


def test_dockerfile_passes_hadolint():
    result = run(tool("hadolint"), "--failure-threshold", "info", str(DOCKER / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_follows_the_compose_specification():
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DOCKER / "compose.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_share_storage_and_tracking():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker"}
    for name in ("ray-head", "ray-worker"):
        node = services[name]
        assert node["build"]["dockerfile"] == "docker/Dockerfile"
        assert node["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert "shared:/shared" in node["volumes"]
        assert node["environment"]["HICMAE_WORKDIR"].startswith("/shared/")
        assert node["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--address ray-head:6379" in services["ray-worker"]["command"]
    assert "postgres:5432" in services["mlflow"]["command"]
    assert "/shared/" in services["mlflow"]["command"]  # artifacts on the volume the nodes also mount


def test_unauthenticated_services_are_published_on_the_hosts_loopback_only():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    published = {name: service.get("ports", []) for name, service in services.items()}
    assert published == {"postgres": [], "mlflow": ["127.0.0.1:5000:5000"], "ray-head": ["127.0.0.1:8265:8265"],
                         "ray-worker": []}


def test_dockerfile_copies_only_files_that_exist():
    sources = re.findall(r"^COPY (?!--from)(\S+)", (DOCKER / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"docker/Dockerfile copies {source}, which does not exist"


def test_image_lock_pins_every_project_dependency():
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not pinned with =="
            lock[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name == "torch":
            continue  # installed by the Dockerfile itself, with CUDA
        assert name in lock, f"requirements.lock does not pin {requirement.name} (pyproject.toml)"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"requirements.lock pins {name}=={lock[name]}, outside pyproject.toml's {requirement.specifier}")
