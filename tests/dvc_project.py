"""Copies of the project as git + DVC repositories, for tests that drive the project's own ``dvc`` as a user does.

    root = tmp_path / "project"
    copy_project(root)
    shrink_params(root / "params.yaml", experiment="my-test")
    project = Project.init(root, project_env(tmp_path, mlflow_server.url))
    assert ran(project.dvc("repro"), STAGES) == set(STAGES)

The copy holds the project's files as git sees them (tracked, and new files not ignored); the project's own checkout,
cache and MLflow store stay untouched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def copy_project(dest: Path) -> None:
    """The project's files as git sees them (tracked, and new files not ignored) into ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout
    for relative in filter(None, listed.split("\0")):
        source = PROJECT_ROOT / relative
        if source.is_file():
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / relative)


def shrink_params(path: Path, experiment: str) -> None:
    """The project's params.yaml, every key kept, scaled down to seconds: 5 speakers x 2 clips, one fold."""
    tree = yaml.safe_load(path.read_text())
    tree["demo"] = {"seed": 0, "speakers": 5, "clips_per_speaker": 2}
    tree["experiment"] = experiment
    tree["preprocess"].update(shard_size=8)
    tree["scaling"].update(preprocess_workers=0)  # no Ray Data here: test_pipeline.py runs it
    demo_model = tree["anchors"]["model_demo"]
    for section in ("pretrain", "finetune"):  # the test size in place of the demo's; each section's switches stay
        model = tree[section]["model"]
        model["size"] = "hicmae_test"
        model["overrides"] = {key: value for key, value in model["overrides"].items() if key not in demo_model}
    tree["pretrain"].update(epochs=1, batch_size=4, optim={"warmup_epochs": 0})
    tree["finetune"].update(epochs=1, batch_size=4, folds=[1], test_views=1,
                            optim={"warmup_epochs": 0, "layer_decay": 0.75})
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def project_env(tmp_path: Path, tracking_uri: str) -> dict:
    """The environment commands run in: the project's venv first on PATH, MLflow at ``tracking_uri``, no cluster,
    a DVC site cache of the test's own, git identities."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HICMAE_WORKDIR", "RAY_ADDRESS", "PYTHONPATH") and not key.startswith("DVC_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", MLFLOW_TRACKING_URI=tracking_uri,
               DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site"),
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    return env


class Project:
    """A git + DVC copy of the project; commands run in it with the project's environment."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env

    @classmethod
    def init(cls, root: Path, env: dict, message: str = "tiny demo") -> Project:
        """A new git repository of the files in ``root``, committed."""
        project = cls(root, env)
        project.run("git", "init", "-q", "-b", "main")
        project.commit(message)
        return project

    def run(self, *command: str) -> str:
        result = subprocess.run(command, cwd=self.root, env=self.env, capture_output=True, text=True)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{output[-6000:]}"
        return output

    def dvc(self, *args: str) -> str:
        return self.run(str(VENV_BIN / "dvc"), *args)

    def commit(self, message: str) -> None:
        """Commit the work tree as it is (a commit even when nothing changed since the last one)."""
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "--allow-empty", "-m", message)

    def edit_params(self, edit) -> None:
        """``edit(tree)`` on params.yaml, in place."""
        path = self.root / "params.yaml"
        tree = yaml.safe_load(path.read_text())
        edit(tree)
        path.write_text(yaml.safe_dump(tree, sort_keys=False))


def ran(output: str, stages: list[str]) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return {stage for stage in stages if f"Running stage '{stage}'" in output}


def kill_leftovers(root: Path) -> None:
    """Stop processes started in ``root`` that outlived their command (none expected)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            in_copy = os.readlink(proc / "cwd").startswith(str(root))
        except OSError:
            continue
        if in_copy:
            os.kill(int(proc.name), signal.SIGTERM)
