"""The face-detector model files, obtained reproducibly instead of committed.

mediapipe 1.2.x ships no face model; the two BlazeFace models inside the mediapipe 0.10.21 wheel (Apache-2.0)
work with its Tasks ``FaceDetector``: short range (128x128 input, faces within about 2 m of the camera) and full
range (192x192 input, sparse weights; farther and smaller faces). ``ensure_face_models`` downloads that wheel
once with pip, extracts both models, checks their sha256 and keeps them in one folder, ``~/.cache/hicmae/`` by
default; ``HICMAE_FACE_MODELS`` (or the ``face_models`` setting) names another folder, where files already
present are used as given.

    python -m preprocessing.face_model      # ensure both files exist, print their paths
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from preprocessing.fileio import atomic_path, sha256_file

WHEEL_REQUIREMENT = "mediapipe==0.10.21"
ENV_VAR = "HICMAE_FACE_MODELS"
CACHE_DIR = Path.home() / ".cache" / "hicmae"


@dataclass(frozen=True)
class FaceModel:
    """One detector model: its path inside the wheel and the sha256 it must have."""

    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


# Detector name -> model, in the order the detector tries them.
MODELS = {
    "short_range": FaceModel("mediapipe/modules/face_detection/face_detection_short_range.tflite",
                             "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"),
    "full_range": FaceModel("mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite",
                            "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1"),
}


def default_folder() -> Path:
    """Where the models are looked for: ``$HICMAE_FACE_MODELS`` if set, else the cache folder."""
    configured = os.environ.get(ENV_VAR)
    return Path(configured) if configured else CACHE_DIR


def _download_wheel(folder: Path) -> Path:
    """pip-download the mediapipe wheel for CPython 3.11 manylinux x86_64 into ``folder``."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
               "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
               "--dest", str(folder), WHEEL_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} for its face models:\n{result.stderr}")
    wheels = sorted(folder.glob("mediapipe-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {WHEEL_REQUIREMENT} produced no wheel in {folder}")
    return wheels[0]


def _extract_model(wheel: Path, model: FaceModel, target: Path) -> None:
    """Copy one model out of the wheel to ``target`` atomically, after checking its hash."""
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(wheel) as archive:
            tmp.write_bytes(archive.read(model.member))
        found = sha256_file(tmp)
        if found != model.sha256:
            raise RuntimeError(f"{model.member} in {wheel.name} has sha256 {found}, expected {model.sha256}")


def ensure_face_models(folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """Paths of the verified detector models by name (``MODELS``), fetching the missing ones in one download.

    Files already in the folder are used as given (a user-supplied copy); fetched files are sha256-checked.
    """
    folder = Path(folder) if folder else default_folder()
    paths = {name: folder / model.filename for name, model in MODELS.items()}
    missing = [name for name, path in paths.items() if not path.exists()]
    if missing:
        with tempfile.TemporaryDirectory(prefix="hicmae-wheel-") as tmp:
            wheel = _download_wheel(Path(tmp))
            for name in missing:
                _extract_model(wheel, MODELS[name], paths[name])
    return paths


if __name__ == "__main__":
    for name, path in ensure_face_models().items():
        print(f"{name}: {path}")
