"""Model library: sizes, shapes, gradients, modes, masking and checkpoint loading."""

import argparse
import json
from pathlib import Path

import pytest
import torch

import model
from model.masking import mask_to_ids

SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference"


def inputs(cfg: model.HiCMAEConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)
    audio = torch.randn(batch, 1, cfg.audio_frames, cfg.audio_mel_bins, generator=g)
    mask_v = model.tube_mask(batch, cfg.video_grid, cfg.mask_ratio, g)
    mask_a = model.random_mask(batch, cfg.num_audio_tokens, cfg.audio_mask_ratio, g)
    return video, audio, mask_v, mask_a


@pytest.mark.parametrize("name, finetune_m, pretrain_m", [
    ("hicmae_tiny", 20.47, None), ("hicmae_small", 45.65, 50.58), ("hicmae_base", 80.79, 99.61)])
def test_parameter_counts_match_the_paper_sizes(name, finetune_m, pretrain_m):
    assert model.count_parameters(model.create_finetune_model(name, 6)) / 1e6 == pytest.approx(finetune_m, abs=0.01)
    if pretrain_m is not None:
        assert model.count_parameters(model.create_pretrain_model(name)) / 1e6 == pytest.approx(pretrain_m, abs=0.01)


@pytest.mark.parametrize("kind, fixture", [("pretrain", "ref-state-dict-pretrain-base.json"),
                                           ("finetune", "ref-state-dict-finetune-base.json")])
def test_base_state_dict_names_and_shapes_equal_the_reference(kind, fixture):
    path = SHARED / fixture
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    reference = json.loads(path.read_text())
    net = model.create_pretrain_model("hicmae_base") if kind == "pretrain" \
        else model.create_finetune_model("hicmae_base", 6)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(ours) == list(reference)
    assert ours == reference


@pytest.mark.parametrize("name", list(model.SIZES))
def test_pretrain_forward_backward_shapes_for_every_size(name):
    net = model.create_pretrain_model(name)
    cfg = net.cfg
    video, audio, mask_v, mask_a = inputs(cfg, batch=2)
    out = net(video, audio, mask_v, mask_a)
    assert out.pred_video.shape == (2, cfg.num_video_masked, 1536) == out.target_video.shape
    assert out.pred_audio.shape == (2, cfg.num_audio_masked, 256) == out.target_audio.shape
    assert cfg.num_video_masked == 720 and cfg.num_audio_masked == 102
    assert out.fusion_video.shape == (2, 80, cfg.embed_dim)
    assert out.fusion_audio.shape == (2, 26, cfg.audio_embed_dim)
    assert len(out.logits_per_video) == 3 and out.logits_per_video[0].shape == (2, 2)
    out.loss.backward()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", list(model.SIZES))
def test_finetune_forward_backward_shapes_for_every_size(name):
    net = model.create_finetune_model(name, num_classes=7)
    video, audio, _, _ = inputs(net.cfg, batch=1)
    logits = net(video, audio)
    assert logits.shape == (1, 7)
    logits.sum().backward()
    assert net.head.weight.grad is not None and net.encoder.patch_embed.proj.weight.grad is not None


def test_gradients_reach_every_pretraining_parameter():
    net = model.create_pretrain_model("hicmae_test")
    out = net(*inputs(net.cfg))
    out.loss.backward()
    without = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == []


def test_contrastive_weight_zero_drops_the_contrastive_term():
    torch.manual_seed(0)
    net = model.create_pretrain_model("hicmae_test", contrastive_weight=0.0).eval()
    out = net(*inputs(net.cfg))
    torch.testing.assert_close(out.loss, out.loss_video + out.loss_audio)
    assert out.loss_contrastive > 0


def test_no_skip_connections_ablation_uses_plain_decoder_blocks():
    net = model.create_pretrain_model("hicmae_test", decoder_skip_connections=False)
    assert not any("cross_attn" in key for key in net.state_dict() if key.startswith("decoder"))
    out = net(*inputs(net.cfg))
    assert out.pred_video.shape[1] == 720


@pytest.mark.parametrize("modality, width", [("video", 2 * 32), ("audio", 2 * 32), ("audio_visual", 4 * 32)])
def test_unimodal_and_audio_visual_finetuning(modality, width):
    net = model.create_finetune_model("hicmae_test", 4, modality=modality)
    video, audio, _, _ = inputs(net.cfg)
    feed_video = video if modality != "audio" else None
    feed_audio = audio if modality != "video" else None
    logits = net(feed_video, feed_audio)
    assert logits.shape == (2, 4) and net.embed_dim == width
    keys = set(net.state_dict())
    assert any(k.startswith("encoder.") for k in keys) == (modality != "audio")
    assert any(k.startswith("encoder_audio.") for k in keys) == (modality != "video")
    assert any(k.startswith("encoder_fusion.") for k in keys) == (modality == "audio_visual")
    logits.sum().backward()
    with pytest.raises(ValueError, match="needs the"):
        net(None, None)


def test_last_layer_feature_fusion_ablation_has_no_layer_weights():
    net = model.create_finetune_model("hicmae_test", 3, feature_fusion="last").eval()
    assert not any("layer_weights" in k for k in net.state_dict())
    video, audio, _, _ = inputs(net.cfg)
    feats = net.forward_features(video, audio)
    torch.testing.assert_close(feats.weighted["video"], feats.last_tokens["video"].mean(1))


def test_regression_head_activation():
    net = model.create_finetune_model("hicmae_test", 3, head_activation="sigmoid")
    out = net(*inputs(net.cfg)[:2])
    assert out.shape == (2, 3) and bool(((out > 0) & (out < 1)).all())


def test_bf16_autocast_runs_and_stays_close_to_float32():
    torch.manual_seed(0)
    net = model.create_pretrain_model("hicmae_test").eval()
    batch = inputs(net.cfg)
    with torch.no_grad():
        full = net(*batch).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = net(*batch).loss
    assert half.dtype == torch.float32
    assert abs(half.item() - full.item()) / full.item() < 0.02


def test_masks_have_fixed_counts_and_tube_structure():
    g = torch.Generator().manual_seed(1)
    mask = model.tube_mask(3, (8, 10, 10), 0.9, g)
    assert mask.shape == (3, 800) and mask.sum(1).tolist() == [720] * 3
    per_slice = mask.view(3, 8, 100)
    assert bool((per_slice == per_slice[:, :1]).all())                # same positions in every time slice
    audio = model.random_mask(3, 128, 0.8, g)
    assert audio.sum(1).tolist() == [102] * 3
    visible, masked = mask_to_ids(audio, 102)
    assert visible.shape == (3, 26) and masked.shape == (3, 102)
    assert bool((visible.diff(dim=1) > 0).all()) and bool((masked.diff(dim=1) > 0).all())
    assert not bool(audio.gather(1, visible).any()) and bool(audio.gather(1, masked).all())
    with pytest.raises(ValueError, match="102 masked"):
        mask_to_ids(torch.zeros(2, 128, dtype=torch.bool), 102)


def test_config_rejects_unknown_fields_and_bad_values():
    with pytest.raises(TypeError, match="no_such_field"):
        model.get_config("hicmae_base", no_such_field=1)
    with pytest.raises(ValueError, match="divisible"):
        model.get_config("hicmae_base", num_heads=7)
    with pytest.raises(KeyError, match="hicmae_huge"):
        model.get_config("hicmae_huge")


def test_loads_a_released_style_checkpoint_with_pickled_args(tmp_path):
    source = model.create_pretrain_model("hicmae_test")
    args = argparse.Namespace(model="pretrain_hicmae_dim256", lr=3e-4, input_size=160)
    path = tmp_path / "checkpoint-99.pth"
    torch.save({"model": source.state_dict(), "optimizer": {}, "epoch": 99, "scaler": {}, "args": args}, path)

    target = model.create_finetune_model("hicmae_test", 6)
    report = model.load_reference_weights(target, path)
    torch.testing.assert_close(target.encoder.blocks[0].attn.qkv.weight, source.encoder.blocks[0].attn.qkv.weight)
    assert "head.weight" in report.missing and "mask_token" in report.unexpected
    assert any(k.startswith("decoder.") for k in report.unexpected)
    assert "loaded" in report.summary() and "missing" in report.summary()


def test_head_of_another_size_is_reported_not_loaded():
    source = model.create_finetune_model("hicmae_test", 6)
    target = model.create_finetune_model("hicmae_test", 4)
    before = target.head.weight.clone()
    report = model.load_reference_weights(target, source.state_dict())
    assert any(item.startswith("head.weight") for item in report.shape_mismatch)
    torch.testing.assert_close(target.head.weight, before)


def test_refuses_a_checkpoint_that_would_execute_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": Payload()}, path)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        model.load_reference_weights(model.create_finetune_model("hicmae_test", 2), path)


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    net = model.create_finetune_model("hicmae_test", 2)
    good = tmp_path / "good.pth"
    torch.save({"model": net.state_dict()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.pth: not a readable PyTorch checkpoint"):
        model.load_reference_weights(net, truncated)
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth"):
        model.load_reference_weights(net, text)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        model.load_reference_weights(net, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="none of its 1 tensors match"):
        model.load_reference_weights(net, {"model": {"resnet.conv1.weight": torch.zeros(3)}})
