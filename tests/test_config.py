"""The configuration schema: params.yaml and every conf/datasets file load; bad values name their key."""

from pathlib import Path

import pytest

from pipeline.config.params import PROJECT_ROOT, ConfigError, apply_overrides, load_dataset_config, load_params
from pipeline.config.training import Params, finetune_settings_for, training_params
from preprocessing.datasets import ADAPTERS


def full_params(*args, **kwargs) -> Params:
    return training_params(load_params(*args, **kwargs))


def test_project_params_load_and_pretrain_and_finetune_share_the_encoder():
    params = full_params()
    pre, fine = params.pretrain.model.build_config(), params.finetune.model.build_config()
    assert (pre.embed_dim, pre.depth, pre.audio_depth, pre.fusion_depth) == \
        (fine.embed_dim, fine.depth, fine.audio_depth, fine.fusion_depth)
    assert set(params.datasets) <= {p.stem for p in (PROJECT_ROOT / "conf" / "datasets").glob("*.yaml")}


@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "conf" / "datasets").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_dataset_config_names_a_known_adapter_and_valid_overrides(path):
    config = load_dataset_config(path.stem)
    assert config.adapter in ADAPTERS
    finetune_settings_for(full_params(), config)  # overrides validate against the schema


def test_invalid_values_and_unknown_keys_name_the_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^\S*params.yaml: finetune\.epochs: Input should be greater than"):
        full_params(overrides=["finetune.epochs=0"])
    with pytest.raises(ConfigError, match=r"pretrain\.optim\.lrr"):
        full_params(overrides=["pretrain.optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"pretrain\.model\.overrides.*no_such_field"):
        full_params(overrides=["pretrain.model.overrides.no_such_field=1"])
    with pytest.raises(ConfigError, match=r"params.yaml: preprocess\.fps"):
        load_params(overrides=["preprocess.fps=-1"])  # the data sections are checked without the training ones
    with pytest.raises(ConfigError, match=r"params.yaml: datasets: no dataset 'nope'; listed: demo"):
        load_params().dataset("nope")
    bad = tmp_path / "params.yaml"
    bad.write_text("datasets: [unclosed")
    with pytest.raises(ValueError, match="params.yaml: not valid YAML"):
        load_params(bad)


def test_overrides_parse_yaml_values_without_touching_the_input():
    tree = {"a": {"b": 1}}
    out = apply_overrides(tree, ["a.b=[1, 2]", "c.d=true"])
    assert out == {"a": {"b": [1, 2]}, "c": {"d": True}} and tree == {"a": {"b": 1}}
    with pytest.raises(ConfigError, match="--set novalue: not key=value"):
        apply_overrides(tree, ["novalue"])
    with pytest.raises(ConfigError, match="--set a.b.c=1: b is not a section"):
        apply_overrides(tree, ["a.b.c=1"])
