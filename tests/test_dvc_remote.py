"""Outputs that depend only on their inputs, as a team works with them: run it again, from another checkout at
another path, with the dataset at another path, through a shared DVC remote.

The dataset is the user's own (a folder outside the project, read by the demo adapter under another name), as a
benchmark lives on a shared mount. Everything runs through the project's own `dvc` in git copies of the project.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from dvc_project import VENV_BIN, Project, copy_project, kill_leftovers, project_env, ran, shrink_params

from pipeline.config.params import RESULT_FIELDS, ScalingSettings
from preprocessing.datasets.demo import generate_demo

pytestmark = pytest.mark.slow

DATASET = "mine"
STAGES = ["demo_data", f"manifest@{DATASET}", f"preprocess@{DATASET}", "pretrain", f"finetune@{DATASET}", "report"]
# A new value for each ScalingSettings field that changes how a stage runs, not what it computes.
RUN_ONLY = {"cpus_per_worker": 0.5, "loader_workers": 0, "max_failures": 5, "checkpoint_every": 3,
            "concurrent_folds": 1, "preprocess_workers": 1, "preprocess_cpus": 1.0}


def use_dataset(project: Project, root) -> None:
    """params.yaml: the user's dataset ``mine`` at ``root`` (and pre-training on it) in place of the demo's."""
    def edit(tree):
        tree["datasets"] = {DATASET: {"root": str(root)}}
        tree["pretrain"]["dataset"] = DATASET
    project.edit_params(edit)


def lock_outputs(project: Project) -> dict[str, dict]:
    """Every stage's output hashes in dvc.lock, by stage and path."""
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    return {stage: {out["path"]: out.get("md5") for out in entry.get("outs", [])}
            for stage, entry in lock["stages"].items()}


@pytest.fixture(scope="module")
def team(tmp_path_factory, mlflow_server):
    """A first checkout with the user's dataset ``mine`` and a local-folder remote (run once for the module)."""
    if shutil.which("git") is None or not (VENV_BIN / "dvc").exists():
        pytest.skip("needs git and the project's dvc")
    tmp_path = tmp_path_factory.mktemp("team")
    dataset = tmp_path / "alice" / "datasets" / "mine"
    generate_demo(dataset, seed=0, speakers=5, clips_per_speaker=2)
    root = tmp_path / "alice" / "project"
    copy_project(root)
    (root / "conf" / "datasets" / f"{DATASET}.yaml").write_text("adapter: demo\n")
    shrink_params(root / "params.yaml", "dvc-remote")
    first = Project.init(root, project_env(tmp_path, mlflow_server.url))
    use_dataset(first, dataset)
    first.dvc("remote", "add", "-d", "shared", str(tmp_path / "remote"))
    first.commit("mine, and the team's remote")
    try:
        yield first, dataset, tmp_path
    finally:
        kill_leftovers(tmp_path)


def test_same_inputs_give_the_same_outputs_in_any_checkout_and_through_a_remote(team):
    first, dataset, tmp_path = team
    assert ran(first.dvc("repro"), STAGES) == set(STAGES)
    outputs = lock_outputs(first)

    # Run again, every stage: byte-identical outputs (data, weights, metrics, model cards, report).
    assert ran(first.dvc("repro", "--force"), STAGES) == set(STAGES)
    assert lock_outputs(first) == outputs
    assert json.loads(first.dvc("status", "--json")) == {}
    first.dvc("push")
    first.commit("results")

    # A colleague: another checkout at another path, the same dataset mount. `dvc pull`, then nothing to run.
    second = Project(tmp_path / "bob" / "work" / "hicmae", first.env)
    second.root.parent.mkdir(parents=True)
    first.run("git", "clone", "-q", str(first.root), str(second.root))
    second.dvc("pull")
    assert json.loads(second.dvc("status", "--json")) == {}
    assert ran(second.dvc("repro"), STAGES) == set()

    # The dataset copied to another path (new modification times), params.yaml pointing there: the manifest stage
    # reads the folder again and writes the same manifest, so nothing after it runs.
    moved = tmp_path / "bob" / "mnt" / "corpora" / "mine"
    shutil.copytree(dataset, moved)
    use_dataset(second, moved)
    assert ran(second.dvc("repro"), STAGES) == {f"manifest@{DATASET}"}
    assert lock_outputs(second) == outputs
    assert json.loads(second.dvc("status", "--json")) == {}

    # From there, the data stages forced again: the same hashes, everything downstream still up to date.
    second.dvc("repro", "--force", "--single-item", f"manifest@{DATASET}", f"preprocess@{DATASET}")
    assert lock_outputs(second) == outputs
    assert json.loads(second.dvc("status", "--json")) == {}


def test_only_the_params_that_change_results_put_stages_out_of_date(team):
    first, _, _ = team
    first.dvc("repro")  # up to date after the test above; the whole DAG when run alone
    assert set(RUN_ONLY) == set(ScalingSettings.model_fields) - set(RESULT_FIELDS)
    for key, value in RUN_ONLY.items():
        first.edit_params(lambda tree, key=key, value=value: tree["scaling"].update({key: value}))
        assert json.loads(first.dvc("status", "--json")) == {}, key
        first.run("git", "checkout", "params.yaml")
    first.edit_params(lambda tree: tree["scaling"].update(num_workers=2))
    assert set(json.loads(first.dvc("status", "--json"))) == {"pretrain", f"finetune@{DATASET}"}
