"""AdamW parameter groups (layer ids, lr scales, weight decay) and the warm-up + cosine schedule, against the
reference's values (docs/hicmae-reference.md section 5.3)."""

import math

import pytest
import torch

import model
from pipeline.config.training import OptimSettings
from pipeline.train.compiled import eager_update
from pipeline.train.optim import build_optimizer, layer_id, lr_at, param_groups, scaled_lrs, set_lr

# HiCMAE-B fine-tuning: 10 blocks per encoder and 2 fusion layers, so num_layers = 12 and ids run from 0 to 13.
BASE_DEPTH, BASE_LAYERS = 10, 12


@pytest.fixture(scope="module")
def base_classifier() -> model.HiCMAEClassifier:
    return model.create_finetune_model("hicmae_base", 6)


def group_of(groups: list[dict]) -> dict[str, dict]:
    """parameter name -> its group"""
    return {name: group for group in groups for name in group["names"]}


# ---------------------------------------------------------------------------------------------------- layer ids


@pytest.mark.parametrize("name, expected", [
    ("encoder.patch_embed.proj.weight", 0),
    ("encoder_audio.patch_embed.proj.bias", 0),
    ("mask_token", 0),
    ("mask_token_audio", 0),
    ("encoder.blocks.0.attn.qkv.weight", 1),               # video block k and audio block k share id k + 1
    ("encoder_audio.blocks.0.attn.qkv.weight", 1),
    ("encoder.blocks.9.mlp.fc2.bias", 10),
    ("encoder_audio.blocks.9.norm2.weight", 10),
    ("encoder_fusion.blocks.0.cross_attn.kv.weight", 11),  # fusion layer k: encoder_depth + 1 + k
    ("encoder_fusion.blocks_audio.0.attn.q_bias", 11),
    ("encoder_fusion.blocks.1.mlp.fc1.weight", 12),
    ("encoder_fusion.blocks_audio.1.norm1.bias", 12),
    ("encoder.norm.weight", 13),                           # everything else: num_layers + 1
    ("encoder_audio.norm.bias", 13),
    ("encoder_fusion.norm.weight", 13),
    ("encoder_fusion.norm_audio.weight", 13),
    ("video_layer_weights", 13),
    ("fc_norm.weight", 13),
    ("head.weight", 13),
])
def test_layer_ids_of_the_reference(name, expected):
    assert layer_id(name, encoder_depth=BASE_DEPTH, num_layers=BASE_LAYERS) == expected


def test_every_base_parameter_gets_the_reference_lr_scale(base_classifier):
    """0.75 ** (13 - id): 0.0238 for the patch embeddings, 0.0317 ... 0.4219 for the encoder blocks,
    0.5625 and 0.75 for the fusion layers, 1 for the rest."""
    groups = param_groups(base_classifier, weight_decay=0.05, layer_decay=0.75)
    names = [name for name, _ in base_classifier.named_parameters()]
    assert sorted(n for g in groups for n in g["names"]) == sorted(names)   # every parameter, exactly once
    scale = {name: group["lr_scale"] for name, group in group_of(groups).items()}
    assert scale["encoder.patch_embed.proj.weight"] == pytest.approx(0.0238, abs=1e-4)
    assert scale["encoder_audio.patch_embed.proj.weight"] == pytest.approx(0.0238, abs=1e-4)
    assert scale["encoder.blocks.0.attn.proj.weight"] == pytest.approx(0.0317, abs=1e-4)
    assert scale["encoder_audio.blocks.0.attn.proj.weight"] == pytest.approx(0.0317, abs=1e-4)
    assert scale["encoder.blocks.9.attn.proj.weight"] == pytest.approx(0.4219, abs=1e-4)
    assert scale["encoder_fusion.blocks.0.attn.proj.weight"] == pytest.approx(0.5625)
    assert scale["encoder_fusion.blocks_audio.1.attn.proj.weight"] == pytest.approx(0.75)
    assert scale["head.weight"] == scale["fc_norm.weight"] == scale["encoder.norm.weight"] == 1.0
    for name in names:
        lid = layer_id(name, BASE_DEPTH, BASE_LAYERS)
        assert scale[name] == pytest.approx(0.75 ** (BASE_LAYERS + 1 - lid)), name


def test_encoders_of_different_depths_number_the_fusion_layers_after_the_deeper_one():
    net = model.create_finetune_model("hicmae_test", 4, depth=3, audio_depth=4)
    groups = group_of(param_groups(net, weight_decay=0.05, layer_decay=0.5))
    # encoder_depth = max(3, 4) = 4, num_layers = 4 + 1 fusion layer = 5: fusion layer 0 gets id 5, the head 6.
    assert groups["encoder.blocks.2.attn.qkv.weight"]["lr_scale"] == 0.5 ** (6 - 3)
    assert groups["encoder_audio.blocks.3.attn.qkv.weight"]["lr_scale"] == 0.5 ** (6 - 4)
    assert groups["encoder_fusion.blocks.0.attn.qkv.weight"]["lr_scale"] == 0.5 ** (6 - 5)
    assert groups["head.weight"]["lr_scale"] == 1.0


def test_without_layer_decay_there_are_two_groups_at_full_lr():
    net = model.create_finetune_model("hicmae_test", 4)
    groups = param_groups(net, weight_decay=0.05, layer_decay=1.0)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    assert all(g["lr_scale"] == 1.0 for g in groups)


# ---------------------------------------------------------------------------------------------------- weight decay


def test_no_weight_decay_on_biases_one_dimensional_parameters_and_mask_tokens():
    net = model.create_pretrain_model("hicmae_test")
    groups = param_groups(net, weight_decay=0.05, layer_decay=0.75)
    decay = {name: group["weight_decay"] for name, group in group_of(groups).items()}
    assert net.mask_token.ndim == 3 and decay["mask_token"] == decay["mask_token_audio"] == 0.0
    for name, param in net.named_parameters():
        no_decay = param.ndim == 1 or name.endswith(".bias") or name.startswith("mask_token")
        assert decay[name] == (0.0 if no_decay else 0.05), name
    assert decay["encoder.blocks.0.attn.q_bias"] == decay["encoder.norm.weight"] == 0.0         # 1-D
    assert decay["encoder.patch_embed.proj.weight"] == decay["decoder.head.weight"] == 0.05      # 5-D, 2-D


def test_the_optimizer_scales_every_group_lr(base_classifier):
    settings = OptimSettings(lr=1e-3, weight_decay=0.05, layer_decay=0.75, betas=(0.9, 0.95))
    optimizer = build_optimizer(base_classifier, settings)
    assert all("names" not in group for group in optimizer.param_groups)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8
    set_lr(optimizer, 2e-4)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(2e-4 * group["lr_scale"])
    assert max(g["lr"] for g in optimizer.param_groups) == pytest.approx(2e-4)
    assert min(g["lr"] for g in optimizer.param_groups) == pytest.approx(2e-4 * 0.75 ** 13)


def test_optimizer_step_clips_the_gradient_norm():
    layer = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    (layer(torch.full((2, 4), 100.0)) ** 2).sum().backward()
    eager_update(optimizer, layer.parameters(), clip_grad=1.0)()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in layer.parameters()]))
    assert norm.item() == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------------------------------------------- schedule


def test_lr_and_min_lr_are_scaled_by_the_total_batch():
    """The reference's fine-tuning (14 x 4 GPUs) and pre-training (160 in all) learning rates."""
    peak, floor = scaled_lrs(OptimSettings(lr=1e-3, min_lr=1e-6), total_batch=56)
    assert (peak, floor) == (pytest.approx(2.1875e-4), pytest.approx(2.1875e-7))
    peak, floor = scaled_lrs(OptimSettings(lr=3e-4, min_lr=1e-5), total_batch=160)
    assert (peak, floor) == (pytest.approx(1.875e-4), pytest.approx(6.25e-6))
    assert scaled_lrs(OptimSettings(lr=1e-3, min_lr=1e-6), total_batch=256) == (1e-3, 1e-6)


def test_warm_up_from_zero_to_the_peak_then_cosine_to_the_floor():
    total, warmup, peak, floor = 1000, 100, 1e-3, 1e-6
    lrs = [lr_at(step, total, warmup, peak, floor) for step in range(total + 1)]
    assert lrs[0] == 0.0                                          # the first step
    assert lrs[50] == pytest.approx(peak / 2)                     # linear warm-up
    assert lrs[warmup] == pytest.approx(peak)                     # the end of the warm-up
    assert lrs[warmup + (total - warmup) // 2] == pytest.approx((peak + floor) / 2)   # half-way down the cosine
    assert lrs[total] == pytest.approx(floor)                     # the end
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1], strict=True))
    assert all(a > b for a, b in zip(lrs[warmup:total], lrs[warmup + 1:], strict=True))
    assert lr_at(total + 10, total, warmup, peak, floor) == pytest.approx(floor)     # stays at the floor


def test_without_warm_up_the_schedule_starts_at_the_peak():
    assert lr_at(0, 10, 0, 1e-3, 1e-5) == 1e-3
    assert lr_at(5, 10, 0, 1e-3, 1e-5) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi / 2)))
