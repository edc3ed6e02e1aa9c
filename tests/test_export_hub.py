"""Exported models in the Hugging Face Hub's layout: the files, loading by folder, file and Hub repo id (a Hub cache
built by hand, offline), strict loading, and pre-training models exported to go on pre-training and to fine-tune."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from model import HiCMAEClassifier, HiCMAEPretrain, get_config
from pipeline.config.training import FinetuneSettings, ModelSettings, PretrainSettings
from pipeline.layout import MissingInput
from pipeline.predict.video import load_model
from pipeline.train import export, hub
from pipeline.train.export import (
    CARD_FILE,
    CONFIG_FILE,
    MODEL_FILES,
    README_FILE,
    WEIGHTS_FILE,
    ModelError,
    export_model,
    export_pretrained,
    init_weights,
    load_exported,
    read_exported,
    resolve_init,
)
from pipeline.train.finetune_fold import FinetuneTask
from pipeline.train.pretrain import PretrainTask
from preprocessing.fileio import sha256_file, write_json
from preprocessing.manifest import DatasetInfo

CLASSES = ["anger", "happy", "neutral"]
INFO = DatasetInfo(name="mine", task="classification", classes=CLASSES)
TEST_METRICS = {"uar": 0.5, "war": 0.625, "num_samples": 8, "confusion_matrix": [[1, 0], [0, 1]]}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple[HiCMAEClassifier, Path]:
    """A seeded random classifier of the test size and its exported folder."""
    torch.manual_seed(0)
    net = HiCMAEClassifier(get_config("hicmae_test"), len(CLASSES)).eval()
    folder = export_model(net.state_dict(), net.cfg, INFO, {"epoch": 3, "test": TEST_METRICS}, "ab" * 32,
                          tmp_path_factory.mktemp("export") / "model", source="a test")
    return net, folder


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[HiCMAEPretrain, Path, Path]:
    """A seeded random pre-training model of the test size: (model, its exported folder, its checkpoint as the
    pre-training stage writes it)."""
    torch.manual_seed(1)
    net = HiCMAEPretrain(get_config("hicmae_test"))
    root = tmp_path_factory.mktemp("pretrain")
    folder = export_pretrained(net.state_dict(), net.cfg, "demo", {"train/loss": 1.5}, "cd" * 32, root / "model")
    torch.save({"model": net.state_dict(), "config": net.cfg.to_dict(), "epoch": 2}, root / "checkpoint.pt")
    return net, folder, root / "checkpoint.pt"


def hub_cache(root: Path, repo: str, folder: Path, monkeypatch) -> Path:
    """``folder`` as the Hub's cache holds a downloaded repo (``models--org--name/refs/main`` naming the commit,
    ``snapshots/<commit>/`` its files), that cache as ``HF_HUB_CACHE``, and the Hub offline."""
    storage = root / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, storage / "snapshots" / COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return storage / "snapshots" / COMMIT


def outputs(net: torch.nn.Module) -> torch.Tensor:
    """The model's output on a fixed random window."""
    generator = torch.Generator().manual_seed(0)
    cfg = net.cfg
    video = torch.randn(1, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=generator)
    audio = torch.randn(1, 1, cfg.audio_frames, cfg.audio_mel_bins, generator=generator)
    with torch.no_grad():
        return net(video, audio)


def tampered(folder: Path, out: Path, change) -> Path:
    """A copy of an exported folder whose tensors ``change`` edits (its card's sha256 updated, so that only the
    tensors' names or shapes are wrong)."""
    shutil.copytree(folder, out)
    state = load_file(str(out / WEIGHTS_FILE))
    change(state)
    save_file(state, str(out / WEIGHTS_FILE))
    card = json.loads((out / CARD_FILE).read_text())
    write_json(out / CARD_FILE, card | {"weights_sha256": sha256_file(out / WEIGHTS_FILE)})
    return out


def test_an_export_is_a_hub_model_repo(classifier, tmp_path):
    net, folder = classifier
    assert sorted(p.name for p in folder.iterdir()) == sorted(MODEL_FILES)
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["architectures"] == ["HiCMAEClassifier"] and config["task"] == "classification"
    assert config["id2label"] == {"0": "anger", "1": "happy", "2": "neutral"} and config["label2id"]["neutral"] == 2
    assert config["input"] == {"num_frames": 16, "sampling_rate": 4, "audio_frames": 256, "audio_mel_bins": 128,
                               "img_size": 160, "fps": 25.0}
    assert export.config_from_dict(config["hicmae_config"]) == net.cfg and config["preprocess"]["fps"] == 25
    readme = (folder / README_FILE).read_text()
    assert readme.startswith("---\n")
    metadata = yaml.safe_load(readme.split("---\n")[1])
    assert metadata["library_name"] == "hicmae" and metadata["datasets"] == ["mine"]
    assert {"audio-visual", "emotion-recognition", "video-classification"} <= set(metadata["tags"])
    result = metadata["model-index"][0]["results"][0]
    assert metadata["model-index"][0]["name"] == "mine"
    assert result["task"]["type"] == "video-classification" and result["dataset"] == {"name": "mine", "type": "mine"}
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"uar": 0.5, "war": 0.625}  # numbers, no counts
    assert "# HiCMAE emotion model: mine" in readme
    # a function of the weights and settings only: the same export elsewhere gives the same bytes
    again = export_model(net.state_dict(), net.cfg, INFO, {"epoch": 3, "test": TEST_METRICS}, "ab" * 32,
                         tmp_path / "model", source="a test")
    assert {name: (again / name).read_bytes() for name in MODEL_FILES} == \
           {name: (folder / name).read_bytes() for name in MODEL_FILES}


def test_a_regression_export_names_its_targets_and_only_finite_metrics(tmp_path):
    info = DatasetInfo(name="moods", task="regression", targets=["valence", "arousal"])
    net = HiCMAEClassifier(get_config("hicmae_test"), 2)
    folder = export_model(net.state_dict(), net.cfg, info, {"test": {"ccc_mean": 0.25, "pcc_mean": float("nan")}},
                          None, tmp_path / "model")
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["targets"] == ["valence", "arousal"] and config["num_outputs"] == 2 and "id2label" not in config
    metadata = yaml.safe_load((folder / README_FILE).read_text().split("---\n")[1])
    assert "regression" in metadata["tags"] and "pipeline_tag" not in metadata
    assert metadata["model-index"][0]["results"][0]["metrics"] == [{"type": "ccc_mean", "value": 0.25,
                                                                    "name": "test ccc_mean"}]


def test_a_model_loads_the_same_by_folder_file_and_hub_repo_id(classifier, tmp_path, monkeypatch):
    net, folder = classifier
    hub_cache(tmp_path / "hub", "org/hicmae-mine", folder, monkeypatch)
    for source in (folder, str(folder), str(folder / WEIGHTS_FILE), "org/hicmae-mine", f"org/hicmae-mine@{COMMIT}"):
        loaded, card = load_exported(source)
        assert card["classes"] == CLASSES and not loaded.training
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items()), source
    loaded, card = load_model("org/hicmae-mine")  # what `hicmae predict --model org/hicmae-mine` (one or many) calls
    assert card["weights_sha256"] == sha256_file(folder / WEIGHTS_FILE)
    torch.testing.assert_close(outputs(loaded), outputs(net), rtol=0, atol=0)


def test_an_unreachable_hub_falls_back_to_the_cache(classifier, tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = hub_cache(tmp_path / "hub", "org/hicmae-mine", classifier[1], monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as imported with it unset
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert export.locate_exported("org/hicmae-mine") == snapshot
    with pytest.raises(MissingInput, match="org/other: .*not in the Hub cache .*the Hub cannot be reached"):
        export.locate_exported("org/other")


def test_a_repo_missing_from_the_offline_cache_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingInput) as raised:
        load_exported("org/not-downloaded")
    message = str(raised.value)
    assert "org/not-downloaded" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message


def test_which_sources_are_hub_repo_ids(tmp_path, monkeypatch):
    assert hub.hub_repo("org/name") == ("org/name", None)
    assert hub.hub_repo("org/hicmae-base.v2@v1.0") == ("org/hicmae-base.v2", "v1.0")
    for local in ("runs/x/model", "./org/name", "/abs/name", "name", "org/model.safetensors", "org/ckpt.pth",
                  "org/name@"):
        assert hub.hub_repo(local) is None, local
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "model").mkdir(parents=True)
    assert hub.hub_repo("runs/model") is None  # an existing path is never a repo id


def test_a_missing_local_folder_is_not_looked_for_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(export, "hub_snapshot", lambda *args: pytest.fail("looked for a local path on the Hub"))
    with pytest.raises(MissingInput, match=r"runs/x/model: no such folder"):
        load_exported("runs/x/model")
    with pytest.raises(FileNotFoundError, match="no such folder"):  # `hicmae predict` says it as one line
        load_model(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("change, names", [
    (lambda state: state.update({"head.weights": state.pop("head.weight")}), ["head.weight", "head.weights"]),
    (lambda state: state.pop("head.bias"), ["head.bias"]),
    (lambda state: state.update({"head.weight": state["head.weight"][:2].clone()}), ["head.weight (2,"]),
], ids=["renamed", "missing", "reshaped"])
def test_a_tensor_that_does_not_fit_is_an_error_naming_it_and_the_file(classifier, tmp_path, change, names):
    folder = tampered(classifier[1], tmp_path / "model", change)
    with pytest.raises(ModelError) as raised:
        load_exported(folder)
    message = str(raised.value)
    assert str(folder / WEIGHTS_FILE) in message and all(name in message for name in names), message


def test_a_pretraining_export_holds_the_whole_model(pretrained):
    net, folder, _ = pretrained
    loaded, card = read_exported(folder)
    assert isinstance(loaded, HiCMAEPretrain) and card["task"] == "pretraining"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    assert any(k.startswith("decoder.") for k in loaded.state_dict())  # the decoders travel: pre-training goes on
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["architectures"] == ["HiCMAEPretrain"] and config["num_outputs"] == 0
    metadata = yaml.safe_load((folder / README_FILE).read_text().split("---\n")[1])
    assert "masked-autoencoder" in metadata["tags"] and "model-index" not in metadata  # no test metrics
    with pytest.raises(ModelError, match="pre-trained model"):
        load_exported(folder)  # no head: nothing to predict with


def test_pretraining_goes_on_from_a_folder_a_repo_id_or_a_checkpoint(pretrained, classifier, tmp_path, monkeypatch):
    net, folder, checkpoint = pretrained
    hub_cache(tmp_path / "hub", "org/hicmae-pretrained", folder, monkeypatch)
    settings = PretrainSettings(model=ModelSettings(size="hicmae_test")).model_dump(mode="json")
    for init in (str(folder), "org/hicmae-pretrained", str(checkpoint)):
        path = resolve_init(init)
        model = PretrainTask({"settings": settings, "init": str(path)}).build_model(0)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items()), init
    assert resolve_init("none") is None
    with pytest.raises(ModelError, match=r"decoder\..*"):  # a fine-tuned model has no decoders to go on with
        PretrainTask({"settings": settings, "init": str(classifier[1])}).build_model(0)


def test_finetuning_starts_the_same_from_the_exported_folder_as_from_the_checkpoint(pretrained, tmp_path):
    net, folder, checkpoint = pretrained
    settings = FinetuneSettings(model=ModelSettings(size="hicmae_test")).model_dump(mode="json")

    def started(init: Path) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the head's random init
        config = {"settings": settings, "info": INFO.model_dump(mode="json"), "split": {}, "clips": {},
                  "init": str(init)}
        return FinetuneTask(config).build_model(0).state_dict()

    from_folder, from_checkpoint = started(resolve_init(str(folder))), started(resolve_init("pretrain", checkpoint))
    assert from_folder.keys() == from_checkpoint.keys()
    assert all(torch.equal(from_folder[k], from_checkpoint[k]) for k in from_folder)
    encoder = [k for k in from_folder if k.startswith("encoder.")]
    assert encoder and all(torch.equal(from_folder[k], net.state_dict()[k]) for k in encoder)
    assert init_weights(folder).keys() == init_weights(checkpoint).keys()
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(ModelError, match="junk.pt: not a readable PyTorch checkpoint"):  # a stage says it in a line
        init_weights(tmp_path / "junk.pt")

