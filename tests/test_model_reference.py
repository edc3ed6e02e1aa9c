"""Our models against the reference implementation's stored outputs (../shared/fixtures/reference)."""


import pytest
import torch

import model

TOL = dict(atol=1e-5, rtol=1e-5)  # the fixture README's recommendation for float32 re-implementations


@pytest.fixture(scope="module")
def pretrain_fixture(reference_file):
    return torch.load(reference_file("reference/pretrain_small.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def finetune_fixture(reference_file):
    return torch.load(reference_file("reference/finetune_small.pt"), map_location="cpu", weights_only=True)


def video_input(inputs: dict) -> torch.Tensor:
    x = inputs["video_uint8"].float() / 255
    x = (x - inputs["video_norm_mean"]) / inputs["video_norm_std"]
    return x.permute(0, 4, 1, 2, 3).contiguous()  # (B, 3, T, H, W)


@pytest.fixture(scope="module")
def pretrain_run(pretrain_fixture):
    torch.manual_seed(0)
    net = model.create_pretrain_model(
        "hicmae_base", **model.config_overrides_from_reference(pretrain_fixture["config"])).eval()
    report = model.load_reference_weights(net, pretrain_fixture["state_dict"])
    inputs = pretrain_fixture["inputs"]
    with torch.no_grad():
        out = net(video_input(inputs), inputs["audio"], inputs["mask_video"], inputs["mask_audio"])
    return net, report, out


def test_pretrain_state_dict_matches_reference_names_and_order(pretrain_fixture, pretrain_run):
    net, report, _ = pretrain_run
    assert list(net.state_dict()) == list(pretrain_fixture["state_dict"])
    assert len(report.loaded) == 540 and not report.missing and not report.unexpected


def test_video_input_matches_reference(pretrain_fixture):
    inputs = pretrain_fixture["inputs"]
    video = video_input(inputs)
    torch.testing.assert_close(video[:, :, 0:2, 0:16, 0:16], inputs["video_float_slice"], **TOL)
    assert video.double().sum().item() == pytest.approx(inputs["video_float_sum_fp64"], rel=1e-9)


def test_pretrain_predictions_match_reference(pretrain_fixture, pretrain_run):
    _, _, out = pretrain_run
    ref = pretrain_fixture["outputs"]
    rows = ref["pred_video_token_index"]
    assert list(out.pred_video.shape) == ref["pred_video_shape"]
    torch.testing.assert_close(out.pred_video[:, rows], ref["pred_video_subset"], **TOL)
    torch.testing.assert_close(out.pred_video.mean(-1), ref["pred_video_row_mean"], **TOL)
    torch.testing.assert_close(out.pred_video.pow(2).mean(-1), ref["pred_video_row_sqmean"], **TOL)
    torch.testing.assert_close(out.pred_audio, ref["pred_audio"], **TOL)


def test_pretrain_features_match_reference(pretrain_fixture, pretrain_run):
    _, _, out = pretrain_run
    ref = pretrain_fixture["outputs"]
    for level in range(3):
        torch.testing.assert_close(out.levels_video[level], ref["inter_video"][level], **TOL)
        torch.testing.assert_close(out.levels_audio[level], ref["inter_audio"][level], **TOL)
        torch.testing.assert_close(out.logits_per_video[level], ref["logits_per_video"][level], **TOL)
        torch.testing.assert_close(out.logits_per_video[level].t(), ref["logits_per_audio"][level], **TOL)
    torch.testing.assert_close(out.encoder_video, ref["encoder_video_out"], **TOL)
    torch.testing.assert_close(out.encoder_audio, ref["encoder_audio_out"], **TOL)
    torch.testing.assert_close(out.fusion_video, ref["fusion_video_out"], **TOL)
    torch.testing.assert_close(out.fusion_audio, ref["fusion_audio_out"], **TOL)


def test_pretrain_targets_and_losses_match_reference(pretrain_fixture, pretrain_run):
    _, _, out = pretrain_run
    ref = pretrain_fixture["outputs"]
    rows = ref["pred_video_token_index"]
    torch.testing.assert_close(out.target_video[:, rows], ref["target_video_subset"], **TOL)
    torch.testing.assert_close(out.target_video.mean(-1), ref["target_video_row_mean"], **TOL)
    torch.testing.assert_close(out.target_audio, ref["target_audio"], **TOL)
    for ours, name in ((out.loss_video, "loss_video"), (out.loss_audio, "loss_audio"),
                       (out.loss_contrastive, "loss_hcmcl"), (out.loss, "loss_total")):
        torch.testing.assert_close(ours, ref[name], **TOL)
    torch.testing.assert_close(out.loss_contrastive_levels, ref["loss_hcmcl_per_level"], **TOL)


def test_position_tables_match_reference(pretrain_fixture, pretrain_run):
    net, _, _ = pretrain_run
    aux = pretrain_fixture["aux"]
    rows = aux["pos_embed_video_rows"]
    torch.testing.assert_close(net.encoder.pos_embed[:, rows], aux["pos_embed_video_encoder_rows"], **TOL)
    torch.testing.assert_close(net.encoder_audio.pos_embed, aux["pos_embed_audio_encoder"], **TOL)
    torch.testing.assert_close(net.decoder.pos_embed[:, rows], aux["pos_embed_video_decoder_rows"], **TOL)
    torch.testing.assert_close(net.decoder_audio.pos_embed, aux["pos_embed_audio_decoder"], **TOL)
    assert not any("pos_embed" in key for key in net.state_dict())


def test_finetune_outputs_match_reference(pretrain_fixture, finetune_fixture):
    cfg = dict(finetune_fixture["config"])
    num_classes = cfg.pop("num_classes")
    net = model.create_finetune_model("hicmae_base", num_classes,
                                      **model.config_overrides_from_reference(cfg)).eval()
    report = model.load_reference_weights(net, finetune_fixture["state_dict"])
    assert list(net.state_dict()) == list(finetune_fixture["state_dict"])
    assert len(report.loaded) == 370 and not report.missing

    inputs = pretrain_fixture["inputs"]
    with torch.no_grad():
        feats = net.forward_features(video_input(inputs), inputs["audio"])
        logits = net(video_input(inputs), inputs["audio"])
    ref = finetune_fixture["outputs"]
    torch.testing.assert_close(logits, ref["logits"], **TOL)
    torch.testing.assert_close(feats.embedding, ref["feature_before_fc_norm"], **TOL)
    torch.testing.assert_close(feats.embedding_normed, ref["feature_after_fc_norm"], **TOL)
    torch.testing.assert_close(feats.layer_means["video"], ref["video_layer_means"], **TOL)
    torch.testing.assert_close(feats.layer_means["audio"], ref["audio_layer_means"], **TOL)
    torch.testing.assert_close(feats.weighted["video"], ref["video_weighted"], **TOL)
    torch.testing.assert_close(feats.weighted["audio"], ref["audio_weighted"], **TOL)
    torch.testing.assert_close(feats.last_tokens["video"][:, 0:800:50], ref["video_last_layer_tokens_subset"], **TOL)
    torch.testing.assert_close(feats.last_tokens["audio"], ref["audio_last_layer_tokens"], **TOL)
    torch.testing.assert_close(feats.fused_tokens["video"][:, 0:800:10], ref["fusion_video_out_subset"], **TOL)
    torch.testing.assert_close(feats.fused_tokens["audio"], ref["fusion_audio_out"], **TOL)


def test_pretrain_checkpoint_initialises_finetune_model_like_the_reference(pretrain_fixture, finetune_fixture):
    cfg = dict(finetune_fixture["config"])
    net = model.create_finetune_model("hicmae_base", cfg.pop("num_classes"),
                                      **model.config_overrides_from_reference(cfg))
    report = model.load_reference_weights(net, {"model": pretrain_fixture["state_dict"]})
    init = finetune_fixture["init_from_pretrain"]
    assert sorted(report.loaded) == sorted(init["loaded_keys"])
    assert sorted(report.missing) == sorted(init["missing_keys"])
    assert sorted(report.unexpected) == sorted(init["unexpected_keys"])
