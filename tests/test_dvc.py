"""The DVC pipeline in a copy of the project: `dvc repro` is incremental, and the paper's ablations run as DVC
experiments (temporary copy and queue) that land side by side in one MLflow experiment.

The slow test copies the project's files into a fresh git repository, shrinks params.yaml to a tiny demo and
drives the project's own `dvc` against a real `mlflow server`; the project's checkout and cache stay untouched.
"""

import csv
import io
import json
import shutil
import sys

import pytest
import yaml
from dvc_project import (
    ALL_STAGES,
    DATASET,
    VENV_BIN,
    Project,
    copy_project,
    kill_leftovers,
    project_env,
    ran,
    shrink_params,
)

from pipeline.ablations import check_ablations, load_ablations, overrides
from pipeline.config.params import PROJECT_ROOT, load_params
from pipeline.config.training import training_params

EXPERIMENT = "dvc-e2e"


# --- the ablation definitions (fast) -----------------------------------------------------------------------

def test_every_ablation_validates_and_dvc_set_param_changes_only_its_section(tmp_path):
    """What `dvc exp run -S` writes into params.yaml loads to the same params as our own override parser, and a
    fine-tuning ablation leaves the pre-training section (the DVC dependency of `pretrain`) unchanged."""
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls on params.yaml

    ablations = load_ablations()
    assert {"no_skip", "no_contrastive", "contrastive_0.1", "last_layer", "audio_only", "video_only"} <= set(ablations)
    params_file = PROJECT_ROOT / "params.yaml"
    check_ablations(ablations, params_file)
    baseline = training_params(load_params(params_file))
    for name, ablation in ablations.items():
        edited = tmp_path / name / "params.yaml"
        edited.parent.mkdir()
        shutil.copyfile(params_file, edited)
        apply_overrides(str(edited), overrides(name, ablation))
        params = training_params(load_params(edited))
        overridden = training_params(load_params(params_file, overrides(name, ablation)))
        assert params.model_dump() == overridden.model_dump(), name
        assert params.variant == name and ablation.paper
        if ablation.first_stage() == "finetune":
            assert params.pretrain == baseline.pretrain, name
        assert params.finetune.model.build_config() != baseline.finetune.model.build_config() \
            or params.pretrain.model.build_config() != baseline.pretrain.model.build_config(), name


def test_an_ablation_of_a_missing_key_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "ablations.yaml"
    bad.write_text("typo:\n  description: x\n  paper: y\n  set: [finetune.model.overides.modality=audio]\n")
    with pytest.raises(ValueError, match=r"ablation typo: finetune\.model\.overides\.modality not in"):
        check_ablations(load_ablations(bad), PROJECT_ROOT / "params.yaml")


# --- the DAG and the experiments (slow) -------------------------------------------------------------------

@pytest.fixture
def project(tmp_path, mlflow_server):
    if shutil.which("git") is None or not (VENV_BIN / "dvc").exists():
        pytest.skip("needs git and the project's dvc")
    root = tmp_path / "project"
    copy_project(root)
    shrink_params(root / "params.yaml", EXPERIMENT)
    copy = Project.init(root, project_env(tmp_path, mlflow_server.url))
    try:
        yield copy
    finally:
        kill_leftovers(root)


@pytest.mark.slow
def test_repro_is_incremental_and_ablations_compare_in_mlflow(project, mlflow_server):
    # 1. A fresh copy: `dvc repro` runs every stage.
    assert ran(project.dvc("repro")) == set(ALL_STAGES)
    project.commit("pipeline state")
    checkpoint = project.root / "runs/pretrain/checkpoint.pt"
    pretrained = (checkpoint.stat().st_mtime_ns, checkpoint.read_bytes())

    # 2. Nothing changed: nothing runs.
    again = project.dvc("repro")
    assert ran(again) == set() and "Data and pipelines are up to date" in again
    assert json.loads(project.dvc("status", "--json")) == {}

    # 3. One fine-tuning param changed: only fine-tuning is out of date (the report follows from its output).
    params_file = project.root / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["finetune"]["seed"] = 1
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(project.dvc("status", "--json"))) == {f"finetune@{DATASET}"}
    project.run("git", "checkout", "params.yaml")

    # 4. Two fine-tuning ablations, each one changed param: one run now in a temporary copy, one queued and then
    # run. Each re-runs only fine-tuning and the report, on the cached pre-training; the workspace stays as it was.
    cli = (sys.executable, "-m", "pipeline.cli", "ablations")
    temp_run = project.run(*cli, "--run", "audio_only")
    assert ran(temp_run) == {f"finetune@{DATASET}", "report"}, temp_run[-3000:]
    project.run(*cli, "--queue", "last_layer")
    queued_run = project.dvc("exp", "run", "--run-all")
    assert ran(queued_run) == {f"finetune@{DATASET}", "report"}, queued_run[-3000:]
    assert (checkpoint.stat().st_mtime_ns, checkpoint.read_bytes()) == pretrained
    assert yaml.safe_load(params_file.read_text())["variant"] == "baseline"
    assert json.loads(project.dvc("status", "--json")) == {}

    # `dvc exp show` lists both, with their variant and fine-tuning metrics.
    table = list(csv.DictReader(io.StringIO(project.dvc("exp", "show", "--csv"))))
    shown = {row["Experiment"]: row for row in table if row["Experiment"]}
    assert set(shown) == {"audio_only", "last_layer"}
    for name, row in shown.items():
        assert row["variant"] == name and float(row["best.war_mean"]) >= 0, row

    # 5. MLflow: one experiment; the fine-tuning run of each variant, tagged and with comparable metrics.
    experiment = mlflow_server.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]

    def search(filter_string: str) -> list[dict]:
        return mlflow_server.post("runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                  "filter": filter_string, "max_results": 100}).get("runs", [])

    def tags(run: dict) -> dict:
        return {tag["key"]: tag["value"] for tag in run["data"]["tags"]}

    finetune_runs = {}
    for variant, changed in (("audio_only", "finetune.model.overrides.modality=audio"),
                             ("last_layer", "finetune.model.overrides.feature_fusion=last")):
        runs = search(f"tags.variant = '{variant}' and attributes.run_name = 'finetune-{DATASET}'")
        assert len(runs) == 1, f"{variant}: {len(runs)} fine-tuning runs"
        run_tags = tags(runs[0])
        assert run_tags["dvc_exp_name"] == variant and run_tags["dvc_stage"] == "finetune"
        assert changed in run_tags["params_changed"] and f"variant={variant}" in run_tags["params_changed"]
        assert run_tags["dvc_exp_baseline"] == project.run("git", "rev-parse", "HEAD").strip()
        finetune_runs[variant] = runs[0]
        folds = search(f"tags.variant = '{variant}' and tags.fold = '1'")
        assert len(folds) == 1 and tags(folds[0])["dvc_exp_name"] == variant
    params_of = {variant: {p["key"]: p["value"] for p in run["data"]["params"]}
                 for variant, run in finetune_runs.items()}
    assert params_of["audio_only"]["model.overrides.modality"] == "audio"
    assert params_of["last_layer"]["model.overrides.feature_fusion"] == "last"
    for run in finetune_runs.values():
        assert {"test/war_mean", "test/uar_mean"} <= {m["key"] for m in run["data"]["metrics"]}
    baseline = search(f"tags.variant = 'baseline' and attributes.run_name = 'finetune-{DATASET}'")
    assert len(baseline) == 1 and "dvc_exp_name" not in tags(baseline[0])
    assert len(search("tags.dvc_stage = 'pretrain'")) == 1  # the ablations reused it
    assert len(search("tags.variant = 'audio_only' and attributes.run_name = 'report'")) == 1
