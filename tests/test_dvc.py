"""The DVC pipeline in a copy of the project: `dvc repro` is incremental, and the paper's ablations run as DVC
experiments (temporary copy and queue) that land side by side in one MLflow experiment.

The slow test copies the project's files into a fresh git repository, shrinks params.yaml to a tiny demo and
drives the project's own `dvc` against a real `mlflow server`; the project's checkout and cache stay untouched.
"""

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.ablations import check_ablations, load_ablations, overrides
from pipeline.config import PROJECT_ROOT, load_params
from pipeline.settings import training_params

VENV_BIN = Path(sys.executable).parent
DATASET = "demo"
EXPERIMENT = "dvc-e2e"
ALL_STAGES = ["demo_data", "manifest@demo", "preprocess@demo", "pretrain", "finetune@demo", "report"]


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

def copy_project(dest: Path) -> None:
    """The project's files as git sees them (tracked, and new files not ignored) into ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout
    for relative in filter(None, listed.split("\0")):
        source = PROJECT_ROOT / relative
        if source.is_file():
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / relative)


def shrink_params(path: Path) -> None:
    """The project's params.yaml, every key kept, scaled down to seconds: 5 speakers x 2 clips, one fold."""
    tree = yaml.safe_load(path.read_text())
    tree["demo"] = {"seed": 0, "speakers": 5, "clips_per_speaker": 2}
    tree["experiment"] = EXPERIMENT
    tree["preprocess"].update(shard_size=8, use_ray=False)  # Ray Data is tested in test_pipeline.py
    demo_model = tree["anchors"]["model_demo"]
    for section in ("pretrain", "finetune"):  # the test size in place of the demo's; each section's switches stay
        model = tree[section]["model"]
        model["size"] = "hicmae_test"
        model["overrides"] = {key: value for key, value in model["overrides"].items() if key not in demo_model}
    tree["pretrain"].update(epochs=1, batch_size=4, optim={"warmup_epochs": 0})
    tree["finetune"].update(epochs=1, batch_size=4, folds=[1], test_views=1,
                            optim={"warmup_epochs": 0, "layer_decay": 0.75})
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


class Project:
    """A git + DVC copy of the project; commands run in it with the project's environment."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env

    def run(self, *command: str) -> str:
        result = subprocess.run(command, cwd=self.root, env=self.env, capture_output=True, text=True)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{output[-6000:]}"
        return output

    def dvc(self, *args: str) -> str:
        return self.run(str(VENV_BIN / "dvc"), *args)

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "-m", message)


def ran(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return {stage for stage in ALL_STAGES if f"Running stage '{stage}'" in output}


def kill_leftovers(root: Path) -> None:
    """Stop processes this test started in the copy that outlived their command (none expected)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            in_copy = os.readlink(proc / "cwd").startswith(str(root))
        except OSError:
            continue
        if in_copy:
            os.kill(int(proc.name), signal.SIGTERM)


@pytest.fixture
def project(tmp_path, mlflow_server):
    if shutil.which("git") is None or not (VENV_BIN / "dvc").exists():
        pytest.skip("needs git and the project's dvc")
    root = tmp_path / "project"
    copy_project(root)
    shrink_params(root / "params.yaml")
    env = {key: value for key, value in os.environ.items()
           if key not in ("HICMAE_WORKDIR", "RAY_ADDRESS", "PYTHONPATH") and not key.startswith("DVC_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", MLFLOW_TRACKING_URI=mlflow_server.url,
               DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site"),
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    copy = Project(root, env)
    copy.run("git", "init", "-q", "-b", "main")
    copy.run("git", "config", "user.name", "test")
    copy.run("git", "config", "user.email", "test@example.com")
    copy.commit("tiny demo")
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
