"""Models that travel: a fine-tuned fold in MLflow's Model Registry (a pyfunc, an alias, ``hicmae predict --model
models:/...``) and ``hicmae verify`` checking a model against its card.

The model is the real fine-tuning stage's (one fold, one epoch, the test-size model, on the shared demo shards),
tracked and registered in a real ``mlflow server`` of this module's own, so that no other test's registrations
move its alias.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from demo_data import demo_workspace
from mlflow_server import free_port, running_mlflow_server
from safetensors.torch import load_file

from model import HiCMAEPretrain, get_config
from pipeline import cli, registry
from pipeline.train.export import (
    CARD_FILE,
    WEIGHTS_FILE,
    config_from_dict,
    export_model,
    export_pretrained,
    read_exported,
)
from pipeline.train.verify import input_differences
from preprocessing.manifest import DatasetInfo
from preprocessing.settings import PreprocessSettings

PARAMS = {
    "experiment": "registry",
    "finetune": {"model": {"size": "hicmae_test"}, "init": "none", "epochs": 1, "batch_size": 4, "folds": [1],
                 "optim": {"warmup_epochs": 0}},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
}
NAME = "hicmae-demo"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_mlflow_server(tmp_path_factory.mktemp("registry-server")) as running:
        yield running


@pytest.fixture(scope="module")
def work(demo_shards, server, tmp_path_factory) -> Path:
    """A work folder on the shared demo shards where the fine-tuning stage ran (fold 1) and registered its model."""
    work = demo_workspace(demo_shards, tmp_path_factory.mktemp("registry") / "work", **PARAMS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HICMAE_WORKDIR", str(work))
        patch.setenv("MLFLOW_TRACKING_URI", server.url)
        assert cli.main(["--params", str(work / "params.yaml"), "finetune", "--dataset", "demo"]) == 0
    mlflow.set_tracking_uri(None)  # the stage set it (and the environment, which the patch put back)
    return work


@pytest.fixture
def at_server(work, server, monkeypatch):
    """This process tracks to the module's server, in ``work``; MLflow's global tracking URI is put back afterwards."""
    monkeypatch.setenv("HICMAE_WORKDIR", str(work))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    mlflow.set_tracking_uri(server.url)
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture
def hicmae_in(work, at_server, capsys):
    """``hicmae ARGS`` in this process, in ``work`` with the module's server: (exit status, stdout, stderr)."""

    def run(*args: str, params: Path | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        status = cli.main(["--params", str(params or work / "params.yaml"), *args])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def fold_model(work: Path) -> Path:
    return work / "runs/demo/finetune/fold-1/model"


def demo_videos(work: Path) -> list[Path]:
    return sorted((work / "data").resolve().parent.joinpath("raw").rglob("*.mp4"))[:2]


@pytest.mark.system
def test_the_stage_registers_its_fold_with_tags_alias_and_signature(work, server, at_server):
    client = mlflow.MlflowClient(server.url)
    version = client.get_model_version_by_alias(NAME, registry.BEST_ALIAS)
    card = json.loads((fold_model(work) / CARD_FILE).read_text())
    assert version.tags["fold"] == "1" and version.tags["variant"] and version.tags["data_hash"] == card["data_hash"]
    assert float(version.tags["validation_score"]) == card["metrics"]["validation_score"]
    fold_run = server.runs_by_name("registry")["demo-fold1"]
    assert version.run_id == fold_run["info"]["run_id"]  # logged in the fold's own run
    signature = mlflow.models.get_model_info(f"models:/{NAME}/{version.version}").signature
    assert "path: string (required)" in str(signature.inputs) and "start: double (optional)" in str(signature.inputs)
    assert "probabilities" in str(signature.outputs) and "status" in str(signature.outputs)
    # the card says how its test metrics were computed: hicmae verify's input
    evaluation = card["evaluation"]
    assert evaluation["weights"] == "best" and evaluation["ranks"] == 1 and evaluation["device"] == "cpu"
    assert len(evaluation["clips"]) == 3 and evaluation["views"] == 2


@pytest.mark.system
def test_the_alias_names_the_fold_best_on_validation_and_moves(work, server, at_server):
    """Two folds registered at once (the stage's model twice, as two folds): ``best`` names the one with the higher
    validation score (their test metrics are the same), and moves with the next run's."""
    run_id, folder = server.runs_by_name("registry")["demo-fold1"]["info"]["run_id"], fold_model(work)
    versions = registry.register_folds("alias", {1: (run_id, folder, 0.9), 2: (run_id, folder, 0.5)}, {"variant": "x"})
    best = mlflow.MlflowClient().get_model_version_by_alias("hicmae-alias", registry.BEST_ALIAS)
    assert best.version == versions[1].version != versions[2].version and best.tags["fold"] == "1"
    versions = registry.register_folds("alias", {1: (run_id, folder, 0.5), 2: (run_id, folder, 0.7)}, {"variant": "x"})
    best = mlflow.MlflowClient().get_model_version_by_alias("hicmae-alias", registry.BEST_ALIAS)
    assert best.version == versions[2].version and best.tags["validation_score"] == "0.7"  # moved


@pytest.mark.system
def test_pyfunc_predictions_are_hicmae_predicts(work, hicmae_in, tmp_path):
    """The registered model, loaded with mlflow.pyfunc, gives the rows `hicmae predict --model models:/...@best`
    writes, failed inputs included; one video by version gives the same clip output."""
    videos = [str(path) for path in demo_videos(work)]
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video\n")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@{registry.BEST_ALIAS}")
    rows = model.predict(pd.DataFrame({"path": [*videos, str(broken)]}))
    table = tmp_path / "predictions.csv"
    status, _, err = hicmae_in("predict", *videos, str(broken), "--model", f"models:/{NAME}@best", "--out",
                               str(table))
    assert status == 0, err
    lines = table.with_suffix(".jsonl").read_text().splitlines()
    written = {row["path"]: row for row in map(json.loads, lines)}  # in the order the clips finished
    assert len(rows) == len(lines) == 3 and [row.status for row in rows][:2] == ["ok", "ok"]
    assert rows[2].status.startswith("unreadable") and written[str(broken)]["status"] == rows[2].status
    for row in rows:
        got, expected = row.model_dump(exclude_none=True), written[row.path]
        assert got.pop("seconds", None) is not None or row.status != "ok"
        expected.pop("seconds", None)
        assert got == {key: value for key, value in expected.items() if value is not None}

    version = mlflow.MlflowClient().get_model_version_by_alias(NAME, registry.BEST_ALIAS).version
    status, out, err = hicmae_in("predict", videos[0], "--model", f"models:/{NAME}/{version}", "--out",
                                 str(tmp_path / "one.json"))
    assert status == 0, err
    one = json.loads((tmp_path / "one.json").read_text())
    np.testing.assert_allclose(list(one["clip"]["probabilities"].values()),
                               list(rows[0].clip.probabilities.values()), atol=1e-5)
    assert one["model"]["weights_sha256"] == json.loads((fold_model(work) / CARD_FILE).read_text())["weights_sha256"]


@pytest.mark.system
def test_verify_holds_exactly_for_the_stage_export_and_its_registered_version(hicmae_in, work):
    status, out, err = hicmae_in("verify", str(fold_model(work)))
    assert status == 0, out + err
    assert "per-clip predictions: identical" in out and "verified: the card's test metrics hold exactly" in out
    assert "uar" in out and "DIFFERS" not in out
    status, out, err = hicmae_in("verify", f"models:/{NAME}@best")
    assert status == 0 and "verified" in out, out + err


@pytest.mark.system
def test_verify_names_other_preprocessing_or_data_as_the_cause(hicmae_in, work):
    status, out, _ = hicmae_in("--set", "preprocess.jpeg_quality=75", "verify", str(fold_model(work)))
    assert status == 1
    assert "its inputs differ (not a worse model)" in out and "jpeg_quality 90 -> 75" in out
    assert "NOT verified" not in out and "recorded" not in out  # no metric compared
    card = json.loads((fold_model(work) / CARD_FILE).read_text())
    catalog = dict.fromkeys(card["evaluation"]["clips"])
    assert input_differences(card, card["data_hash"], card["preprocess"], catalog) == []
    [cause] = input_differences(card, "0" * 64, card["preprocess"], catalog)
    assert cause.startswith("data: the processed shards here have hash 000000000000")


@pytest.mark.system
def test_verify_fails_after_a_changed_weight(hicmae_in, work, tmp_path):
    """Weights changed and exported with the card's metrics and evaluation: the numbers do not hold. Weights changed
    in the file alone: it no longer matches its card."""
    card = json.loads((fold_model(work) / CARD_FILE).read_text())
    state = load_file(str(fold_model(work) / WEIGHTS_FILE))
    state["head.bias"][0] += 2.0  # the first class favoured
    info = DatasetInfo(name=card["dataset"], task=card["task"], classes=card["classes"])
    changed = export_model(state, config_from_dict(card["config"]), info, card["metrics"], card["data_hash"],
                           tmp_path / "changed", name=card["name"], preprocess=PreprocessSettings(**card["preprocess"]),
                           source=card["source"], evaluation=card["evaluation"])
    status, out, err = hicmae_in("verify", str(changed))
    assert status == 1, out + err
    assert "per-clip predictions: DIFFER" in out and "NOT verified: the numbers do not hold exactly" in out

    edited = shutil.copytree(fold_model(work), tmp_path / "edited")
    data = bytearray((edited / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0x01
    (edited / WEIGHTS_FILE).write_bytes(bytes(data))
    status, out, err = hicmae_in("verify", str(edited))
    assert status == 1 and "does not match model_card.json (sha256 differs)" in err and not out


def test_the_best_fold_is_chosen_on_validation_and_a_missing_server_is_one_line(random_classifier, monkeypatch,
                                                                                 capfd):
    assert registry.best_fold({1: 0.8, 2: 0.9, 3: 0.9}) == 2
    gone = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", gone)
    mlflow.set_tracking_uri(gone)
    try:
        assert registry.register_folds("mine", {1: ("0" * 32, random_classifier, 0.5)}, {}) == {}
    finally:
        mlflow.set_tracking_uri(None)
    assert capfd.readouterr().out == ("finetune mine: not registered in MLflow's Model Registry (connection refused); "
                                      "the exported models are in runs/ as before\n")


@pytest.mark.system
def test_the_pretraining_stage_goes_on_from_an_exported_folder_and_registers_its_own(demo_shards, server, tmp_path,
                                                                                     monkeypatch):
    """The real stage with ``pretrain.init`` an exported pre-training folder and a learning rate too small to move a
    weight: the model it exports and registers is the folder's (a fresh start would be another random init)."""
    torch.manual_seed(1)
    start = HiCMAEPretrain(get_config("hicmae_test"))
    folder = export_pretrained(start.state_dict(), start.cfg, "demo", {}, None, tmp_path / "start")
    work = demo_workspace(demo_shards, tmp_path / "work", experiment="registry-pretrain", scaling=PARAMS["scaling"],
                          pretrain={"dataset": "demo", "model": {"size": "hicmae_test"}, "init": str(folder),
                                    "epochs": 1, "batch_size": 4,
                                    "optim": {"lr": 1e-12, "min_lr": 0, "warmup_epochs": 0, "weight_decay": 0}})
    monkeypatch.setenv("HICMAE_WORKDIR", str(work))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    try:
        assert cli.main(["--params", str(work / "params.yaml"), "pretrain"]) == 0
        [version] = mlflow.MlflowClient(server.url).search_model_versions("name = 'hicmae-pretrain-demo'")
    finally:
        mlflow.set_tracking_uri(None)
    exported, card = read_exported(work / "runs/pretrain/model")
    went_on = exported.state_dict()
    for name, tensor in start.state_dict().items():
        torch.testing.assert_close(went_on[name], tensor, rtol=0, atol=1e-9, msg=name)
    assert "going on from the weights sha256" in card["source"] and version.tags["dataset"] == "demo"
