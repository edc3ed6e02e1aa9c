"""The video's hand-off from the loader to the model: uint8 frames and their geometry in, the model's normalised
float32 video out, equal to the former per-clip transforms within the tolerances stated here, in a number of ops
that does not grow with the batch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.augment import AugmentConfig, train_video_fields
from pipeline.data.augment.transforms import sample_erase_box, sample_resized_crop
from pipeline.data.loaders import collate
from pipeline.data.video_batch import (
    GEOMETRY,
    NOISE_SEED,
    VIDEO,
    Geometry,
    batch_noise,
    device_batch,
    example_video,
    video_fields,
)
from pipeline.data.windows import PRETRAIN_SCALES, multi_scale_crop
from pipeline.train.op_count import OpCounter

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
# Pre-training's crop is resized on the device in float32; the reference resizes the uint8 crop with PIL, which
# rounds to whole grey levels after each of its two passes. Tolerance: one grey level (after normalisation,
# 1 / 255 / std: at most 0.0175), and a third of one on average.
GREY_LEVEL = 1 / 255 / STD
PRETRAIN_MAX_LEVELS, PRETRAIN_MEAN_LEVELS = 1.0, 1 / 3
# The batch's crops are resized by grid_sample, the former per-clip code resized them with F.interpolate: the same
# positions, rounded differently. grid_sample computes each position back from a float32 coordinate in [-1, 1]
# (((g + 1) * W - 1) / 2 on a GPU), rounding at values up to 2W: ~2.2e-5 pixels off at most on a 160-pixel side;
# times the largest step between neighbouring pixels after normalisation (1 / 0.225 = 4.4), on two axes: 2e-4.
# Measured on uniform noise frames (the steepest there are): at most 1e-4. For scale: a grey level is 0.0175, and
# bf16 autocast rounds these values by up to 0.008.
RESAMPLE_TOLERANCE = 2.5e-4
MAX_DEVICE_OPS = 40  # per batch, whatever its size


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


def noise_clip(rng: np.random.Generator, frames: int = 2, side: int = 160) -> np.ndarray:
    """(frames, side, side, 3) uint8 uniform noise: the steepest steps between neighbouring pixels."""
    return rng.integers(0, 256, (frames, side, side, 3), dtype=np.uint8)


def drawn_fields(frames: np.ndarray, rng: np.random.Generator) -> dict:
    """Video entries with a random geometry: a fine-tuning crop (area 8-100 %), a pre-training crop or the whole
    frame; a flip half the time; an erasing box half the time."""
    side = frames.shape[1]
    crop = [sample_resized_crop(rng, side, side, (0.08, 1.0), (3 / 4, 4 / 3)), multi_scale_crop(side, side, rng),
            None][rng.integers(3)]
    erase = sample_erase_box(rng, side, side, (0.02, 1 / 3), (0.3, 1 / 0.3)) if rng.random() < 0.5 else None
    return video_fields(frames, crop=crop, flip=bool(rng.random() < 0.5), erase=erase,
                        noise_seed=int(rng.integers(2**63)))


def former_video(frames: np.ndarray, geometry: Geometry, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One clip as the former per-clip code made it, (3, T, H, W): normalised; the crop resized to the frame's size
    with F.interpolate (bilinear, align_corners=False); flipped; the erasing box filled from ``noise`` (3, T, H, W)."""
    video = normalised(frames)
    top, left, h, w = geometry.crop
    video = F.interpolate(video[:, :, top:top + h, left:left + w], size=video.shape[-2:], mode="bilinear",
                          align_corners=False)
    if geometry.flip:
        video = video.flip(-1)
    top, left, h, w = geometry.erase
    if h:
        video[..., top:top + h, left:left + w] = noise[..., top:top + h, left:left + w]
    return video


def device_ops(examples: list[dict]) -> int:
    """Aten ops that ``device_batch`` dispatches for these examples' batch."""
    batch = collate(examples)
    with OpCounter() as counter:
        device_batch(batch, "cpu")
    return counter.ops


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


def test_finetune_geometry_is_the_former_float_path_within_rounding():
    """Resized crop (torch bilinear on the normalised clip, as the reference), then flip."""
    cfg = AugmentConfig(rand_augment=False, random_erase=False, flip_prob=0.5)
    rng = np.random.default_rng(2)
    flips = 0
    for seed in range(8):
        frames = textured_clip(rng, frames=4)
        fields = train_video_fields(frames, np.random.default_rng(seed), cfg)
        geometry = Geometry.from_row(fields[GEOMETRY].tolist())
        flips += geometry.flip
        expected = former_video(frames, geometry)
        torch.testing.assert_close(example_video(fields), expected, rtol=0, atol=RESAMPLE_TOLERANCE)
    assert 0 < flips < 8


@pytest.mark.parametrize("size", [1, 8, 24])
def test_a_batch_equals_the_former_per_clip_transforms_given_its_noise(size):
    rng = np.random.default_rng(size)
    examples = [{**drawn_fields(noise_clip(rng), rng), "label": i} for i in range(size)]
    batch = collate(examples)
    assert batch[VIDEO].dtype == torch.uint8 and batch[VIDEO].shape == (size, 2, 160, 160, 3)
    assert batch[GEOMETRY].shape == (size, 10)
    moved = device_batch(batch, "cpu")
    assert set(moved) == {VIDEO, "label"} and torch.equal(moved["label"], torch.arange(size))
    assert moved[VIDEO].shape == (size, 3, 2, 160, 160) and moved[VIDEO].is_contiguous()
    drawn = [Geometry.from_row(row) for row in batch[GEOMETRY].tolist()]
    noise = batch_noise(batch[GEOMETRY][:, NOISE_SEED].numpy(), moved[VIDEO].shape, "cpu")  # the batch's noise
    expected = torch.stack([former_video(example[VIDEO], geometry, clip_noise)
                            for example, geometry, clip_noise in zip(examples, drawn, noise, strict=True)])
    torch.testing.assert_close(moved[VIDEO], expected, rtol=0, atol=RESAMPLE_TOLERANCE)
    if size > 1:  # every kind of geometry was drawn
        assert any(g.crop[2] < 160 for g in drawn) and any(g.crop == (0, 0, 160, 160) for g in drawn)
        assert any(g.flip for g in drawn) and any(g.erase[2] > 0 for g in drawn)
    assert torch.equal(device_batch(batch, "cpu")[VIDEO], moved[VIDEO])  # the noise again: exact resume


def test_device_transforms_take_the_same_few_ops_at_any_batch_size():
    rng = np.random.default_rng(5)
    frames = noise_clip(rng, side=32)
    everything = video_fields(frames, crop=(1, 2, 20, 24), flip=True, erase=(3, 4, 5, 6), noise_seed=1)
    drawn = [everything] + [drawn_fields(frames, rng) for _ in range(159)]
    counts = {size: device_ops(drawn[:size]) for size in (2, 40, 160)}
    assert counts[2] == counts[40] == counts[160] <= MAX_DEVICE_OPS, counts
    crops_only = [video_fields(frames, crop=multi_scale_crop(32, 32, rng)) for _ in range(40)]
    whole = [video_fields(frames)] * 40
    assert device_ops(whole[:2]) == device_ops(whole) < device_ops(crops_only[:2]) == device_ops(crops_only)
    assert device_ops(crops_only) < counts[2]  # what no clip needs is skipped


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


def test_video_fields_carry_the_geometry_in_one_row():
    with pytest.raises(ValueError, match="uint8"):
        video_fields(np.zeros((2, 8, 8, 3), dtype=np.float32))
    whole = Geometry.from_row(video_fields(np.zeros((2, 8, 6, 3), dtype=np.uint8))[GEOMETRY].tolist())
    assert whole == Geometry((0, 0, 8, 6), False, (0, 0, 0, 0), 0)
    drawn = Geometry((1, 2, 3, 4), True, (5, 6, 7, 8), 2**63 - 1)
    assert Geometry.from_row(drawn.row().tolist()) == drawn
