"""Fine-tuning augmentation: shapes, determinism, per-clip parameters, RandAugment ops, Mixup/CutMix, criteria."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from model.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.config.augment import parse_rand_augment
from pipeline.data.augment import AugmentConfig, eval_video_transform, mixup_cutmix, train_video_transform
from pipeline.data.augment.enhance import brightness_clip, color_clip, contrast_clip, sharpness_clip
from pipeline.data.augment.mixing import mix_targets, sample_cutmix_box
from pipeline.data.augment.rand_augment import (
    INCREASING_OPS,
    ORIGINAL_OPS,
    RandAugmentOp,
    affine_clip,
    apply_rand_augment,
    autocontrast_clip,
    equalize_clip,
    invert_table,
    posterize_table,
    rotation_coefficients,
    sample_rand_augment,
    solarize_add_table,
    solarize_table,
)
from pipeline.train.losses import label_smoothing_cross_entropy, soft_target_cross_entropy

NO_AUGMENTATION = AugmentConfig(rand_augment=False, random_resized_crop=False, flip=False, random_erase=False,
                                mixup=False)


def smooth_frame(size: int = 160) -> np.ndarray:
    """(size, size, 3) uint8 with gradients in every channel (no flat regions)."""
    y, x = np.mgrid[0:size, 0:size]
    channels = [(np.sin(x / 9) + 1) * 120, (np.cos(y / 13) + 1) * 120, (x + y) / (2 * size) * 255]
    return np.stack(channels, -1).astype(np.uint8)


def random_clip(seed: int = 0, frames: int = 16, height: int = 160, width: int = 160) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(frames, height, width, 3), dtype=np.uint8)


def textured_frame(seed: int = 0) -> np.ndarray:
    """A smooth frame at half contrast plus noise: every RandAugment op changes it."""
    noise = np.random.default_rng(seed).integers(0, 40, size=(160, 160, 3))
    return (smooth_frame() // 2 + 40 + noise).astype(np.uint8)


def constant_clip(frames: int = 16) -> np.ndarray:
    """A clip whose frames are all the same image."""
    return np.repeat(smooth_frame()[None], frames, axis=0)


def manual_normalize(frames: np.ndarray) -> torch.Tensor:
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    return (video - mean) / std


# ---------------------------------------------------------------------------------------------------- config


def test_config_defaults_are_the_reference_recipe():
    cfg = AugmentConfig()
    assert (cfg.num_ops, cfg.magnitude, cfg.magnitude_std, cfg.increasing) == (4, 7.0, 0.5, True)
    assert cfg.rrc_scale == (0.08, 1.0) and cfg.rrc_ratio == (0.75, 1.3333)
    assert (cfg.flip_prob, cfg.erase_prob, cfg.mixup_alpha, cfg.cutmix_alpha) == (0.5, 0.25, 0.8, 1.0)
    assert (cfg.mix_prob, cfg.switch_prob, cfg.label_smoothing, cfg.mix_audio) == (1.0, 0.5, 0.1, False)
    assert cfg == AugmentConfig(**parse_rand_augment("rand-m7-n4-mstd0.5-inc1"))


def test_config_rejects_unknown_fields_and_bad_ranges():
    with pytest.raises(ValueError):
        AugmentConfig(mixup_aplha=0.2)
    with pytest.raises(ValueError):
        AugmentConfig(rrc_scale=(1.0, 0.5))


def test_parse_rand_augment():
    assert parse_rand_augment("rand-m9-n2") == {"magnitude": 9.0, "num_ops": 2, "increasing": False}
    with pytest.raises(ValueError):
        parse_rand_augment("rand-x3")


# ---------------------------------------------------------------------------------------------------- clip transforms


def test_eval_transform_is_resize_and_normalise():
    frames = random_clip(frames=4, height=120, width=96)
    out = eval_video_transform(frames)
    assert out.shape == (3, 4, 160, 160) and out.dtype == torch.float32
    resized = np.stack([np.asarray(Image.fromarray(f).resize((160, 160), Image.Resampling.BILINEAR)) for f in frames])
    torch.testing.assert_close(out, manual_normalize(resized), rtol=0, atol=1e-6)
    assert torch.equal(out, eval_video_transform(frames))


def test_train_transform_shape_and_seed_reproducibility():
    frames = random_clip()
    first = train_video_transform(frames, np.random.default_rng(3))
    assert first.shape == (3, 16, 160, 160) and first.dtype == torch.float32 and first.is_contiguous()
    assert torch.equal(first, train_video_transform(frames, np.random.default_rng(3)))
    assert not torch.equal(first, train_video_transform(frames, np.random.default_rng(4)))


def test_train_transform_without_augmentation_equals_eval():
    frames = random_clip(frames=8, height=100, width=140)
    out = train_video_transform(frames, np.random.default_rng(0), NO_AUGMENTATION)
    assert torch.equal(out, eval_video_transform(frames))


@pytest.mark.parametrize("seed", range(12))
def test_every_frame_gets_the_same_geometry_and_colour(seed):
    """Identical input frames stay identical, except inside the erasing box, which sits at one place."""
    out = train_video_transform(constant_clip(), np.random.default_rng(seed), AugmentConfig(erase_prob=1.0))
    differs = (out != out[:, :1]).any(dim=0).any(dim=0)  # (H, W): pixels where some frame differs from frame 0
    rows, cols = torch.nonzero(differs, as_tuple=True)
    assert rows.numel() > 0, "the erasing box must be drawn with fresh noise per frame"
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box_area = (bottom - top) * (right - left)
    assert 0.02 * 160 * 160 * 0.9 < box_area < 160 * 160 / 3 * 1.1
    outside = torch.ones(160, 160, dtype=torch.bool)
    outside[top:bottom, left:right] = False
    assert torch.equal(out[..., outside], out[:, :1, outside].expand_as(out[..., outside]))


def test_all_frames_identical_without_erasing():
    cfg = AugmentConfig(random_erase=False)
    for seed in range(8):
        out = train_video_transform(constant_clip(), np.random.default_rng(seed), cfg)
        assert torch.equal(out, out[:, :1].expand_as(out))


def test_erasing_noise_is_standard_normal():
    cfg = AugmentConfig(rand_augment=False, random_resized_crop=False, flip=False, erase_prob=1.0)
    frames = np.full((16, 160, 160, 3), 128, dtype=np.uint8)
    out = train_video_transform(frames, np.random.default_rng(1), cfg)
    noise = out[out != eval_video_transform(frames)]
    assert noise.numel() > 3 * 16 * 0.02 * 160 * 160 * 0.9
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1.0) < 0.05


def test_flip_mirrors_every_frame():
    cfg = NO_AUGMENTATION.model_copy(update={"flip": True, "flip_prob": 1.0})
    frames = random_clip(frames=3)
    assert torch.equal(train_video_transform(frames, np.random.default_rng(0), cfg),
                       eval_video_transform(frames).flip(-1))


def test_random_resized_crop_changes_content_not_shape():
    cfg = NO_AUGMENTATION.model_copy(update={"random_resized_crop": True})
    frames = random_clip(frames=2)
    out = train_video_transform(frames, np.random.default_rng(0), cfg)
    assert out.shape == (3, 2, 160, 160)
    assert not torch.equal(out, eval_video_transform(frames))


def test_train_transform_rejects_bad_input():
    with pytest.raises(ValueError):
        train_video_transform(np.zeros((16, 160, 160, 3), dtype=np.float32), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------- RandAugment


@pytest.mark.parametrize("table", [INCREASING_OPS, ORIGINAL_OPS], ids=["increasing", "original"])
def test_every_op_runs_and_keeps_the_shape(table):
    cfg = AugmentConfig(increasing=table is INCREASING_OPS)
    frames = np.repeat(textured_frame()[None], 2, axis=0)
    for name, definition in table.items():
        arg = definition.level_to_arg(7.0, cfg) if definition.level_to_arg else None
        out = apply_rand_augment(frames, [RandAugmentOp(name, arg)], cfg.increasing)
        assert out.shape == frames.shape and out.dtype == np.uint8, name
        assert np.array_equal(out[0], out[1]), name
        assert not np.array_equal(out, frames), name


def test_increasing_op_set_is_the_reference_list():
    assert set(INCREASING_OPS) == {
        "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
        "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
        "TranslateXRel", "TranslateYRel"}


def test_level_to_argument_mappings():
    cfg = AugmentConfig()
    arg = {name: d.level_to_arg(7.0, cfg) for name, d in INCREASING_OPS.items() if d.level_to_arg}
    assert arg["Rotate"] == pytest.approx(21.0)
    assert arg["ShearX"] == pytest.approx(0.21)
    assert arg["TranslateXRel"] * 160 == pytest.approx(0.315 * 160)  # at level 10: 0.45 * 160 = 72 pixels
    assert arg["PosterizeIncreasing"] == 2 and arg["SolarizeIncreasing"] == 77 and arg["SolarizeAdd"] == 77
    assert arg["ContrastIncreasing"] == pytest.approx(0.63)  # factor 1 +- 0.63


def test_sampled_ops_follow_probability_and_magnitude_noise():
    cfg = AugmentConfig()
    rng = np.random.default_rng(0)
    draws = [sample_rand_augment(rng, cfg) for _ in range(2000)]
    assert np.mean([len(ops) for ops in draws]) == pytest.approx(2.0, abs=0.1)  # 4 ops, each kept with p=0.5
    rotations = np.array([op.arg for ops in draws for op in ops if op.name == "Rotate"])
    assert (rotations > 0).mean() == pytest.approx(0.5, abs=0.1)
    assert np.abs(rotations).mean() == pytest.approx(21.0, abs=0.3)
    assert np.abs(rotations).std() == pytest.approx(1.5, abs=0.3)  # 0.5 level noise = 1.5 degrees
    assert np.abs(rotations).max() <= 30.0


def test_lookup_ops_equal_pil():
    img = Image.fromarray(random_clip(frames=1)[0])
    frame = np.asarray(img)
    assert np.array_equal(invert_table()[frame], np.asarray(ImageOps.invert(img)))
    for bits in range(1, 9):
        assert np.array_equal(posterize_table(bits)[frame], np.asarray(ImageOps.posterize(img, bits)))
    assert not posterize_table(0).any()  # level 10 keeps no bit (current Pillow refuses bits=0)
    for threshold in (0, 77, 128, 256):
        assert np.array_equal(solarize_table(threshold)[frame], np.asarray(ImageOps.solarize(img, threshold)))
    expected = np.where(frame < 128, np.minimum(frame.astype(int) + 77, 255), frame)
    assert np.array_equal(solarize_add_table(77)[frame], expected)


def histogram_test_clip() -> np.ndarray:
    """Frames with full-range noise, a narrow range, a constant channel, two values and a sparse histogram."""
    rng = np.random.default_rng(7)
    frames = [random_clip(frames=1)[0], textured_frame(), rng.integers(100, 110, size=(160, 160, 3)),
              np.stack([np.full((160, 160), 42), rng.integers(0, 256, (160, 160)), rng.choice([3, 200], (160, 160))],
                       axis=-1),
              rng.choice([0, 17, 90, 91, 250], size=(160, 160, 3), p=[0.01, 0.5, 0.2, 0.19, 0.1])]
    return np.stack(frames).astype(np.uint8)


@pytest.mark.parametrize("clip_op, pil_op", [(autocontrast_clip, ImageOps.autocontrast),
                                             (equalize_clip, ImageOps.equalize)], ids=["autocontrast", "equalize"])
def test_histogram_ops_equal_pil(clip_op, pil_op):
    frames = histogram_test_clip()
    expected = np.stack([np.asarray(pil_op(Image.fromarray(frame))) for frame in frames])
    assert np.array_equal(clip_op(frames), expected)


@pytest.mark.parametrize("clip_op, enhancer", [(brightness_clip, ImageEnhance.Brightness),
                                              (contrast_clip, ImageEnhance.Contrast),
                                              (color_clip, ImageEnhance.Color),
                                              (sharpness_clip, ImageEnhance.Sharpness)],
                         ids=["brightness", "contrast", "color", "sharpness"])
def test_enhancers_equal_pil(clip_op, enhancer):
    """Value for value, over the factors RandAugment draws (1 +- 0.9) and beyond."""
    frames = histogram_test_clip()
    for delta in (-1.0, -0.9, -0.63, -0.21, 0.0, 0.3, 0.63, 0.9, 1.5):
        expected = np.stack([np.asarray(enhancer(Image.fromarray(frame)).enhance(1.0 + delta)) for frame in frames])
        assert np.array_equal(clip_op(frames, delta), expected), delta


@pytest.mark.parametrize("coefficients", [
    (1, 0.21, 0, 0, 1, 0), (1, 0, 0, -0.25, 1, 0), (1, 0, 0.315 * 160, 0, 1, 0), (1, 0, 0, 0, 1, -48.3),
    rotation_coefficients(21.0, 160, 160), rotation_coefficients(-7.5, 160, 160)])
def test_geometric_ops_match_pil_bicubic(coefficients):
    """Same geometry and fill as PIL's bicubic affine transform; only the cubic kernel differs slightly."""
    frame = smooth_frame()
    img = Image.fromarray(frame)
    expected = np.asarray(img.transform(img.size, Image.Transform.AFFINE, coefficients,
                                        resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128))).astype(int)
    out = affine_clip(frame[None], coefficients)[0].astype(int)
    assert np.abs(out - expected).max() <= 3
    assert np.abs(out - expected).mean() < 0.6


def test_rotation_coefficients_equal_pil_rotate():
    img = Image.fromarray(smooth_frame())
    by_rotate = np.asarray(img.rotate(17.0, resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128)))
    by_transform = np.asarray(img.transform(img.size, Image.Transform.AFFINE, rotation_coefficients(17.0, 160, 160),
                                            resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128)))
    assert np.array_equal(by_rotate, by_transform)


# ---------------------------------------------------------------------------------------------------- Mixup / CutMix


def batch(seed: int = 0, size: int = 4):
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(size, 3, 16, 32, 32, generator=gen)
    audio = torch.randn(size, 1, 256, 128, generator=gen)
    targets = torch.arange(size)  # every sample's partner has another class
    return video, audio, targets


def test_mix_targets_sum_to_one_and_weight_the_own_class():
    targets = torch.tensor([0, 1, 2, 3])
    soft = mix_targets(targets, num_classes=5, lam=0.7, smoothing=0.1)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))
    own = soft[torch.arange(4), targets]
    torch.testing.assert_close(own, torch.full((4,), 0.7 * 0.9 + 0.1 / 5))
    partner = soft[torch.arange(4), targets.flip(0)]
    torch.testing.assert_close(partner, torch.full((4,), 0.3 * 0.9 + 0.1 / 5))


def test_mixup_blends_video_with_the_reversed_batch():
    video, audio, targets = batch()
    cfg = AugmentConfig(cutmix_alpha=0.0)
    mixed, same_audio, soft = mixup_cutmix(video, audio, targets, 4, cfg, np.random.default_rng(0))
    lam = (soft[0, targets[0]].item() - 0.1 / 4) / 0.9
    torch.testing.assert_close(mixed, video * lam + video.flip(0) * (1 - lam))
    assert same_audio is audio
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))


def test_cutmix_box_is_the_same_in_every_frame_and_corrects_lambda():
    video, audio, targets = batch()
    cfg = AugmentConfig(mixup_alpha=0.0)
    mixed, _, soft = mixup_cutmix(video, audio, targets, 4, cfg, np.random.default_rng(2))
    pasted = (mixed == video.flip(0)) & (mixed != video)           # (B, 3, T, H, W)
    box = pasted[0, 0, 0]
    assert box.any()
    assert torch.equal(pasted[0], box.expand_as(pasted[0]))         # every channel and frame
    area_fraction = box.float().mean().item()
    lam = (soft[0, 0].item() - 0.1 / 4) / 0.9
    assert lam == pytest.approx(1 - area_fraction, abs=1e-5)
    assert torch.equal(mixed[..., ~box], video[..., ~box])


def test_cutmix_box_is_clipped_to_the_frame():
    rng = np.random.default_rng(0)
    for lam in (0.05, 0.5, 0.9):
        for _ in range(50):
            (y0, y1, x0, x1), corrected = sample_cutmix_box(rng, 40, 30, lam)
            assert 0 <= y0 <= y1 <= 40 and 0 <= x0 <= x1 <= 30
            assert corrected == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 1200)


@pytest.mark.parametrize("use_cutmix", [False, True])
def test_mix_audio_flag(use_cutmix):
    video, audio, targets = batch()
    alphas = {"mixup_alpha": 0.0} if use_cutmix else {"cutmix_alpha": 0.0}
    original = audio.clone()
    _, kept, _ = mixup_cutmix(video, audio, targets, 4, AugmentConfig(**alphas), np.random.default_rng(5))
    assert torch.equal(kept, original)
    _, mixed, soft = mixup_cutmix(video, audio, targets, 4, AugmentConfig(mix_audio=True, **alphas),
                                  np.random.default_rng(5))
    assert torch.equal(audio, original), "inputs must not be modified"
    assert not torch.equal(mixed, original)
    lam = (soft[0, targets[0]].item() - 0.1 / 4) / 0.9
    if use_cutmix:
        replaced = (mixed != original).any(dim=3)[0, 0]              # (T_a,) time steps taken from the partner
        steps = torch.nonzero(replaced).flatten()
        assert torch.equal(steps, torch.arange(steps[0], steps[-1] + 1))
        assert steps.numel() == round((1 - lam) * 256)
    else:
        torch.testing.assert_close(mixed, original * lam + original.flip(0) * (1 - lam))


def test_mixing_disabled_gives_smoothed_one_hot():
    video, audio, targets = batch()
    out_video, _, soft = mixup_cutmix(video, audio, targets, 4, AugmentConfig(mixup=False), np.random.default_rng(0))
    assert torch.equal(out_video, video)
    torch.testing.assert_close(soft[torch.arange(4), targets], torch.full((4,), 0.9 + 0.1 / 4))


def test_odd_batch_is_rejected():
    video, audio, targets = batch(size=3)
    with pytest.raises(ValueError):
        mixup_cutmix(video, audio, targets, 4, AugmentConfig(), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------- criteria


def test_soft_target_cross_entropy_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    soft = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    log_z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    first = -(0.2 * (1 - log_z) + 0.3 * (2 - log_z) + 0.5 * (3 - log_z))
    second = math.log(3)
    assert soft_target_cross_entropy(logits, soft).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_label_smoothing_cross_entropy_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [2.0, 0.0, -1.0]])
    targets = torch.tensor([0, 1])
    expected = []
    for row, target in zip(logits.tolist(), targets.tolist(), strict=True):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        expected.append(0.9 * -log_p[target] + 0.1 * -sum(log_p) / 3)
    loss = label_smoothing_cross_entropy(logits, targets, smoothing=0.1)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    smoothed = mix_targets(targets, 3, lam=1.0, smoothing=0.1)   # the same loss written as soft targets
    assert soft_target_cross_entropy(logits, smoothed).item() == pytest.approx(loss.item(), rel=1e-6)
