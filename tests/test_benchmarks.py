"""The speed benchmarks run (tiny settings, CPU) and report sane figures; the loader's lazy decoding changes
no output."""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.config import FinetuneSettings, PretrainSettings
from pipeline.data import ClipWindows, finetune_eval_examples, finetune_train_examples, pretrain_examples, shard_paths
from preprocessing.shards import PackedFrames, decode_frames, encode_frames, iter_shards

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_BATCHES = ["--pretrain-batch", "2", "--finetune-batch", "2"]


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_step():
    return load_benchmark("train_step")


@pytest.fixture(scope="module")
def loader():
    return load_benchmark("loader")


@pytest.fixture(scope="module")
def shards(loader, tmp_path_factory) -> list[str]:
    """Four synthetic 3.2 s clips (80 frames: longer than a 64-frame window, so windows start anywhere)."""
    return shard_paths(loader.build_shards(tmp_path_factory.mktemp("shards"), clips=4, seconds=3.2, per_shard=2))


# ----------------------------------------------------------------------------------------------------------------
# Lazy frame decoding.


def test_packed_frames_decode_only_the_indexed_frames_and_equal_full_decoding(monkeypatch):
    ys, xs = np.mgrid[0:48, 0:64]
    frames = np.stack([np.stack([xs * 3 + 7 * t, ys * 4, xs + ys], axis=-1) for t in range(10)]).astype(np.uint8)
    blob = encode_frames(frames)
    full = decode_frames(blob)
    assert full.shape == (10, 48, 64, 3)
    first = cv2.imdecode(np.frombuffer(blob, np.uint8, struct.unpack_from("<I", blob, 4)[0], 44), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(full[0], first[:, :, ::-1])   # RGB, as OpenCV's BGR reversed
    packed = PackedFrames(blob)
    decoded = []
    original = PackedFrames.decode
    monkeypatch.setattr(PackedFrames, "decode", lambda self, i: decoded.append(i) or original(self, i))
    assert len(packed) == 10 and decoded == []
    window = np.array([2, 5, 8, 9, 9, 9])                  # a window held at the last frame
    np.testing.assert_array_equal(packed[window], full[window])
    assert sorted(decoded) == [2, 5, 8, 9]                 # each distinct frame once, nothing else
    np.testing.assert_array_equal(packed[3], full[3])
    np.testing.assert_array_equal(packed[-1], full[-1])
    np.testing.assert_array_equal(packed[1:7:2], full[1:7:2])
    assert packed[np.array([], dtype=int)].shape[0] == 0
    with pytest.raises(IndexError):
        packed[np.array([10])]


def test_unreadable_frame_names_the_field_and_the_frame():
    blob = bytearray(encode_frames(np.zeros((2, 16, 16, 3), np.uint8)))
    blob[12:40] = bytes(28)                                 # the first JPEG's header
    with pytest.raises(ValueError, match=r"frames.jpgs: frame 0 of 2"):
        PackedFrames(bytes(blob))[0]


def test_training_examples_are_identical_with_lazy_decoding(shards, loader):
    pretrain, finetune = PretrainSettings(), FinetuneSettings()
    makers = [
        partial(pretrain_examples, window=pretrain.window, cfg=pretrain.model.build_config(), seed=3),
        partial(finetune_train_examples, window=finetune.window, augment=finetune.augment, seed=3),
        partial(finetune_eval_examples, window=finetune.window, views=2),
    ]
    for make in makers:
        lazy = ClipWindows(shards, make)                                          # the training path
        eager = ClipWindows(shards, partial(loader.decode_all_first, make))       # every frame decoded first
        for epoch in (0, 1):
            lazy.set_epoch(epoch)
            eager.set_epoch(epoch)
            pairs = list(zip(lazy, eager, strict=True))
            assert len(pairs) == 4 * (2 if make.func is finetune_eval_examples else 1)
            for a, b in pairs:
                assert a.keys() == b.keys()
                for key in a:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    clip = next(iter_shards(shards[:1]))
    assert isinstance(clip.frames, np.ndarray) and clip.frames.shape == (80, 160, 160, 3)  # eager by default


# ----------------------------------------------------------------------------------------------------------------
# The benchmarks' entry points.


@pytest.mark.timeout(300)  # loader workers are forked processes: fail rather than hang
def test_loader_benchmark_reports_both_paths(loader, tmp_path):
    out = tmp_path / "loader.json"
    result = loader.main(["--clips", "4", "--seconds", "1", "--workers", "0", "1", "--batch", "2",
                          "--step-rate", "10", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert {(r["examples"], r["decode"], r["workers"]) for r in rows} == {
        (kind, decode, workers) for kind in ("pretrain", "finetune") for decode in ("all", "window")
        for workers in (0, 1)}
    for row in rows:
        assert row["samples"] == 4 and row["samples_per_s"] > 0 and row["samples_per_cpu_s"] > 0
        assert row["times_step_rate"] == pytest.approx(row["samples_per_s"] / 10)


def test_train_step_benchmark_reports_throughput_and_exact_flops(train_step, tmp_path):
    out = tmp_path / "train.json"
    result = train_step.main(["--tiny", "--sizes", "hicmae_tiny", "--steps", "2", "--warmup", "1",
                              "--peak-size", "128", "--json", str(out), *TINY_BATCHES])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert result["peak_tflops"] > 0 and result["peak_dtype"] == "float32"
    assert [(r["stage"], r["batch"]) for r in result["rows"]] == [("pretrain", 2), ("finetune", 2)]
    for row in result["rows"]:
        assert row["samples_per_s"] > 0 and row["peak_memory_gb"] > 0 and 0 < row["mfu"]
        assert row["gflop_per_sample"] == row["analytic_gflop_per_sample"] > 0   # counter = hand count
        assert row["tflops"] == pytest.approx(row["mfu"] * result["peak_tflops"])


@pytest.mark.parametrize(("stage", "batch", "gflop"), [("pretrain", 40, 89.535), ("finetune", 14, 275.356)])
def test_base_flops_per_sample_counted_and_by_hand(train_step, stage, batch, gflop):
    """HiCMAE-B: 89.5 GFLOP per pre-training sample, 275.4 per fine-tuning sample (forward + backward)."""
    settings = train_step.stage_settings(stage, "hicmae_base", {})
    cfg = train_step.model_config(settings)
    counted = train_step.counted_flops(stage, settings, cfg, batch)
    assert counted == train_step.analytic_flops(stage, cfg, batch)
    assert counted / batch / 1e9 == pytest.approx(gflop, abs=1e-3)


def test_bf16_losses_stay_within_one_percent_of_float32(train_step):
    result = train_step.main(["--tiny", "--sizes", "hicmae_tiny", "--check-numerics", "--numerics-steps", "2",
                              *TINY_BATCHES])
    assert [row["stage"] for row in result["numerics"]] == ["pretrain", "finetune"]
    for row in result["numerics"]:
        assert len(row["loss_bf16"]) == len(row["loss_fp32"]) == 2
        assert 0 < row["max_relative_difference"] < 0.01   # > 0: bf16 autocast really ran


def test_autocast_precision_is_checked():
    from pipeline.raytrain import autocast

    with autocast(torch.device("cpu"), "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision"):
        autocast(torch.device("cpu"), "fp16")



def test_small_faces_benchmark_finds_the_distant_face(tmp_path):
    """benchmarks/small_faces.py on one face size: full range on tiles finds it, short range alone does not."""
    command = [sys.executable, str(BENCHMARKS / "small_faces.py"), "--sizes", "28", "--short-sides", "480",
               "--seconds", "0.5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split(" | ")[2]: line.split(" | ") for line in done.stdout.splitlines() if line.startswith("28 |")}
    assert float(rows["short_then_full_range"][3]) >= 0.9 and float(rows["short_range"][3]) == 0.0
