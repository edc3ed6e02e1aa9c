"""The video's hand-off from the loader to the model: uint8 frames and their geometry in, the model's normalised
float32 video out, equal to the former loader-side transforms within the tolerances stated here."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.augment import AugmentConfig, train_video_fields
from pipeline.data import collate
from pipeline.examples import PRETRAIN_SCALES, multi_scale_crop
from pipeline.video_batch import GEOMETRY, VIDEO, Geometry, device_batch, example_video, video_fields

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
# Pre-training's crop is resized on the device in float32; the reference resizes the uint8 crop with PIL, which
# rounds to whole grey levels after each of its two passes. Tolerance: one grey level (after normalisation,
# 1 / 255 / std: at most 0.0175), and a third of one on average.
GREY_LEVEL = 1 / 255 / STD
PRETRAIN_MAX_LEVELS, PRETRAIN_MEAN_LEVELS = 1.0, 1 / 3


def textured_clip(rng: np.random.Generator, frames: int = 16, side: int = 160) -> np.ndarray:
    """(frames, side, side, 3) uint8: smooth gradients that move between frames, plus noise."""
    y, x = np.mgrid[0:side, 0:side]
    clip = []
    for t in range(frames):
        smooth = np.stack([(np.sin((x + 3 * t) / 9) + 1) * 100, (np.cos((y - 2 * t) / 13) + 1) * 100,
                           (x + y) / (2 * side) * 200], axis=-1)
        clip.append(smooth + rng.integers(0, 55, size=(side, side, 3)))
    return np.clip(clip, 0, 255).astype(np.uint8)


def normalised(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float32 as the former loader did: v / 255, then mean and std."""
    return (torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255.0 - MEAN) / STD


def pil_crop_resize(frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The former pre-training transform's crop and resize: PIL bilinear on the uint8 crop, back to the frame's size."""
    top, left, h, w = box
    side = frames.shape[1]
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(f[top:top + h, left:left + w]))
                                .resize((side, side), Image.Resampling.BILINEAR)) for f in frames])


def test_normalisation_is_exactly_the_float32_arithmetic():
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, None, :, None], (1, 1, 256, 3)).copy()
    out = example_video(video_fields(values))
    assert out.shape == (3, 1, 1, 256) and out.dtype == torch.float32
    assert torch.equal(out, normalised(values))


def test_pretrain_crop_matches_pil_within_one_grey_level():
    rng = np.random.default_rng(0)
    worst, means = 0.0, []
    for _ in range(12):
        frames = textured_clip(rng)
        box = multi_scale_crop(160, 160, rng)
        levels = ((example_video(video_fields(frames, crop=box)) - normalised(pil_crop_resize(frames, box)))
                  .abs() / GREY_LEVEL)
        worst, means = max(worst, levels.max().item()), [*means, levels.mean().item()]
    assert worst <= PRETRAIN_MAX_LEVELS + 1e-3
    assert np.mean(means) <= PRETRAIN_MEAN_LEVELS
    assert worst > 0.5  # the resize really differs from PIL's: the test would see a wrong tolerance


def test_multi_scale_crop_draws_the_reference_sides():
    rng = np.random.default_rng(1)
    sides = {int(160 * scale) for scale in PRETRAIN_SCALES}
    pairs = set()
    for _ in range(400):
        top, left, h, w = multi_scale_crop(160, 160, rng)
        assert h in sides and w in sides and 0 <= top <= 160 - h and 0 <= left <= 160 - w
        pairs.add((h, w))
    steps = {(sorted(sides).index(h), sorted(sides).index(w)) for h, w in pairs}
    assert all(abs(i - j) <= 1 for i, j in steps) and len(pairs) == 4 + 2 * 3  # aspect distortion at most one step


def test_finetune_geometry_is_the_former_float_path_exactly():
    """Resized crop (torch bilinear on the normalised clip, as the reference), then flip: bit for bit."""
    cfg = AugmentConfig(rand_augment=False, random_erase=False, flip_prob=0.5)
    rng = np.random.default_rng(2)
    flips = 0
    for seed in range(8):
        frames = textured_clip(rng, frames=4)
        fields = train_video_fields(frames, np.random.default_rng(seed), cfg)
        geometry = Geometry.from_row(fields[GEOMETRY].tolist())
        top, left, h, w = geometry.crop
        crop = normalised(frames)[:, :, top:top + h, left:left + w]
        expected = F.interpolate(crop, size=(160, 160), mode="bilinear", align_corners=False)
        if geometry.flip:
            expected, flips = expected.flip(-1), flips + 1
        assert torch.equal(example_video(fields), expected)
    assert 0 < flips < 8


def test_erasing_fills_its_box_with_seeded_noise_and_nothing_else():
    frames = textured_clip(np.random.default_rng(3), frames=4)
    box = (20, 30, 40, 50)
    erased = example_video(video_fields(frames, erase=box, noise_seed=7))
    kept = example_video(video_fields(frames))
    inside = torch.zeros(160, 160, dtype=torch.bool)
    inside[20:60, 30:80] = True
    assert torch.equal(erased[..., ~inside], kept[..., ~inside])
    noise = erased[..., inside]                                     # (3, 4, 2000): fresh in every frame and channel
    assert not torch.equal(noise[:, 0], noise[:, 1]) and not torch.equal(noise[0], noise[1])
    assert torch.equal(erased, example_video(video_fields(frames, erase=box, noise_seed=7)))
    assert not torch.equal(erased, example_video(video_fields(frames, erase=box, noise_seed=8)))


def test_a_batch_equals_its_examples_one_by_one():
    rng = np.random.default_rng(4)
    cfg = AugmentConfig(rand_augment=False, erase_prob=0.5)
    examples = [{**video_fields(textured_clip(rng, frames=2), crop=multi_scale_crop(160, 160, rng)), "label": 0},
                {**video_fields(textured_clip(rng, frames=2)), "label": 1}]
    examples += [{**train_video_fields(textured_clip(rng, frames=2), np.random.default_rng(s), cfg), "label": s}
                 for s in range(6)]
    drawn = [Geometry.from_row(example[GEOMETRY].tolist()) for example in examples]
    assert any(geometry.erase[2] > 0 for geometry in drawn) and any(geometry.flip for geometry in drawn)
    batch = collate(examples)
    assert batch[VIDEO].dtype == torch.uint8 and batch[VIDEO].shape == (8, 2, 160, 160, 3)
    assert batch[GEOMETRY].shape == (8, 10)
    moved = device_batch(batch, "cpu")
    assert set(moved) == {VIDEO, "label"}
    assert moved[VIDEO].shape == (8, 3, 2, 160, 160) and moved[VIDEO].is_contiguous()
    for example, video in zip(examples, moved[VIDEO], strict=True):
        assert torch.equal(video, example_video(example))
    assert torch.equal(moved["label"], torch.tensor([0, 1, 0, 1, 2, 3, 4, 5]))


def test_video_fields_carry_the_geometry_in_one_row():
    with pytest.raises(ValueError, match="uint8"):
        video_fields(np.zeros((2, 8, 8, 3), dtype=np.float32))
    whole = Geometry.from_row(video_fields(np.zeros((2, 8, 6, 3), dtype=np.uint8))[GEOMETRY].tolist())
    assert whole == Geometry((0, 0, 8, 6), False, (0, 0, 0, 0), 0) and not whole.changes(8, 6)
    drawn = Geometry((1, 2, 3, 4), True, (5, 6, 7, 8), 2**63 - 1)
    assert Geometry.from_row(drawn.row().tolist()) == drawn and drawn.changes(8, 6)
