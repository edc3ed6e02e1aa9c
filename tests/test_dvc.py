"""The DVC pipeline as a team works with it, in git copies of the project driven by the project's own `dvc` against
a real `mlflow server`: `dvc repro` is incremental and re-runs a stage only for the params that change its result;
the paper's ablations run as DVC experiments (temporary copy and queue) that land side by side in one MLflow
experiment; and every output depends only on its inputs, so another checkout at another path, with the dataset
mounted elsewhere, gets byte-identical outputs, and through a shared DVC remote has nothing to run.

One DVC project serves the whole module (the DAG runs once in it): the dataset is the user's own (a folder outside
the project, read by the demo adapter under another name), as a benchmark lives on a shared mount, and the project
has a local-folder remote. The project's checkout, cache and MLflow store stay untouched.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys

import pytest
import yaml
from dvc_project import VENV_BIN, Project, copy_project, kill_leftovers, project_env, ran, shrink_params

from pipeline.ablations import check_ablations, load_ablations, overrides
from pipeline.config.params import PROJECT_ROOT, RESULT_FIELDS, ScalingSettings, load_params
from pipeline.config.training import training_params
from preprocessing.datasets.demo import generate_demo

EXPERIMENT = "dvc-e2e"
DATASET = "mine"
STAGES = ["demo_data", f"manifest@{DATASET}", f"preprocess@{DATASET}", "pretrain", f"finetune@{DATASET}", "report"]
# A new value for each ScalingSettings field that changes how a stage runs, not what it computes.
RUN_ONLY = {"cpus_per_worker": 0.5, "loader_workers": 0, "max_failures": 5, "checkpoint_every": 3,
            "concurrent_folds": 1, "preprocess_workers": 1, "preprocess_cpus": 1.0, "placement_strategy": "SPREAD",
            "stop_grace_s": 5.0}


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


# --- the DAG, its experiments and its outputs (system) ---------------------------------------------------

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
    """A first checkout with the user's dataset ``mine`` and a local-folder remote; the DAG has not run yet."""
    if shutil.which("git") is None or not (VENV_BIN / "dvc").exists():
        pytest.skip("needs git and the project's dvc")
    tmp_path = tmp_path_factory.mktemp("team")
    dataset = tmp_path / "alice" / "datasets" / "mine"
    generate_demo(dataset, seed=0, speakers=5, clips_per_speaker=2)
    root = tmp_path / "alice" / "project"
    copy_project(root)
    (root / "conf" / "datasets" / f"{DATASET}.yaml").write_text("adapter: demo\n")
    shrink_params(root / "params.yaml", EXPERIMENT)
    first = Project.init(root, project_env(tmp_path, mlflow_server.url))
    use_dataset(first, dataset)
    first.dvc("remote", "add", "-d", "shared", str(tmp_path / "remote"))
    first.commit("mine, and the team's remote")
    try:
        yield first, dataset, tmp_path
    finally:
        kill_leftovers(tmp_path)


@pytest.mark.system
def test_repro_is_incremental_and_only_result_params_put_stages_out_of_date(team):
    project, _, _ = team
    # 1. A fresh copy: `dvc repro` runs every stage, and dvc.lock records each one's outputs.
    assert ran(project.dvc("repro"), STAGES) == set(STAGES)
    assert all(lock_outputs(project)[stage] for stage in STAGES)
    project.commit("pipeline state")

    # 2. Nothing changed: nothing runs.
    again = project.dvc("repro")
    assert ran(again, STAGES) == set() and "Data and pipelines are up to date" in again
    assert json.loads(project.dvc("status", "--json")) == {}

    # 3. One fine-tuning param changed: only fine-tuning is out of date (the report follows from its output).
    project.edit_params(lambda tree: tree["finetune"].update(seed=1))
    assert set(json.loads(project.dvc("status", "--json"))) == {f"finetune@{DATASET}"}
    project.run("git", "checkout", "params.yaml")

    # 4. How a stage runs (CPUs, loader processes, retries, folds at once) changes nothing; the global batch (workers,
    #    micro-batches) does.
    assert set(RUN_ONLY) == set(ScalingSettings.model_fields) - set(RESULT_FIELDS)
    for key, value in RUN_ONLY.items():
        project.edit_params(lambda tree, key=key, value=value: tree["scaling"].update({key: value}))
        assert json.loads(project.dvc("status", "--json")) == {}, key
        project.run("git", "checkout", "params.yaml")
    for key in ("num_workers", "accum_steps"):
        project.edit_params(lambda tree, key=key: tree["scaling"].update({key: 2}))
        assert set(json.loads(project.dvc("status", "--json"))) == {"pretrain", f"finetune@{DATASET}"}, key
        project.run("git", "checkout", "params.yaml")


@pytest.mark.system
def test_ablations_run_as_experiments_and_compare_in_mlflow(team, mlflow_server):
    project, _, _ = team
    project.dvc("repro")  # up to date after the test above; the whole DAG when run alone
    project.commit("pipeline state")
    checkpoint = project.root / "runs/pretrain/checkpoint.pt"
    pretrained = (checkpoint.stat().st_mtime_ns, checkpoint.read_bytes())
    params_file = project.root / "params.yaml"

    # Two fine-tuning ablations, each one changed param: one run now in a temporary copy, one queued and then
    # run. Each re-runs only fine-tuning and the report, on the cached pre-training; the workspace stays as it was.
    cli = (sys.executable, "-m", "pipeline.cli", "ablations")
    temp_run = project.run(*cli, "--run", "audio_only")
    assert ran(temp_run, STAGES) == {f"finetune@{DATASET}", "report"}, temp_run[-3000:]
    project.run(*cli, "--queue", "last_layer")
    queued_run = project.dvc("exp", "run", "--run-all")
    assert ran(queued_run, STAGES) == {f"finetune@{DATASET}", "report"}, queued_run[-3000:]
    assert (checkpoint.stat().st_mtime_ns, checkpoint.read_bytes()) == pretrained
    assert yaml.safe_load(params_file.read_text())["variant"] == "baseline"
    assert json.loads(project.dvc("status", "--json")) == {}

    # `dvc exp show` lists both, with their variant and fine-tuning metrics.
    table = list(csv.DictReader(io.StringIO(project.dvc("exp", "show", "--csv"))))
    shown = {row["Experiment"]: row for row in table if row["Experiment"]}
    assert set(shown) == {"audio_only", "last_layer"}
    for name, row in shown.items():
        assert row["variant"] == name and float(row["best.war_mean"]) >= 0, row

    # MLflow: one experiment; the fine-tuning run of each variant, tagged and with comparable metrics.
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


@pytest.mark.system
def test_same_inputs_give_the_same_outputs_in_any_checkout_and_through_a_remote(team):
    first, dataset, tmp_path = team
    first.dvc("repro")  # up to date after the tests above; the whole DAG when run alone
    assert json.loads(first.dvc("status", "--json")) == {}
    outputs = lock_outputs(first)
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

    # From there every stage forced again, in this checkout at its other path on the moved dataset: byte-identical
    # outputs (data, weights, metrics, model cards, report), everything still up to date.
    assert ran(second.dvc("repro", "--force"), STAGES) == set(STAGES)
    assert lock_outputs(second) == outputs
    assert json.loads(second.dvc("status", "--json")) == {}
    for output in ("runs/pretrain/checkpoint.pt", f"runs/{DATASET}/metrics.json", "reports/results.md"):
        assert (second.root / output).read_bytes() == (first.root / output).read_bytes(), output
