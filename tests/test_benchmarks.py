"""The speed benchmarks run (tiny settings, CPU) and report sane figures; the loader's lazy decoding changes
no output (the shard format itself: test_shards.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config.training import FinetuneSettings, PretrainSettings
from pipeline.data.loaders import ClipDataset, clip_catalog, verified_shards
from pipeline.data.windows import finetune_eval_examples, finetune_train_examples, pretrain_examples
from pipeline.train.loop import progress_line
from preprocessing.shard_index import ShardIndex, read_samples
from preprocessing.shards import decode_sample

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
def shards(loader, tmp_path_factory) -> list[ShardIndex]:
    """Four synthetic 3.2 s clips (80 frames: longer than a 64-frame window, so windows start anywhere)."""
    processed = loader.build_shards(tmp_path_factory.mktemp("shards"), clips=4, seconds=3.2, per_shard=2)
    return verified_shards(processed, "rebuild them")


# ----------------------------------------------------------------------------------------------------------------
# Lazy frame decoding in the data path.


def test_training_examples_are_identical_with_lazy_decoding(shards, loader):
    pretrain, finetune = PretrainSettings(), FinetuneSettings()
    makers = [
        partial(pretrain_examples, window=pretrain.window, cfg=pretrain.model.build_config(), seed=3),
        partial(finetune_train_examples, window=finetune.window, augment=finetune.augment, seed=3),
        partial(finetune_eval_examples, window=finetune.window, views=2),
    ]
    for make in makers:
        entries = list(clip_catalog(shards).values())
        lazy = ClipDataset(entries, make)                                          # the training path
        eager = ClipDataset(entries, partial(loader.decode_all_first, make))       # every frame decoded first
        for epoch in (0, 1):
            lazy.set_epoch(epoch)
            eager.set_epoch(epoch)
            pairs = [pair for i in range(len(entries)) for pair in zip(lazy[i], eager[i], strict=True)]
            assert len(pairs) == 4 * (2 if make.func is finetune_eval_examples else 1)
            for a, b in pairs:
                assert a.keys() == b.keys()
                for key in a:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    clip = decode_sample(next(read_samples(shards[0])))
    assert isinstance(clip.frames, np.ndarray) and clip.frames.shape == (80, 160, 160, 3)  # eager by default


# ----------------------------------------------------------------------------------------------------------------
# The benchmarks' entry points.


@pytest.mark.timeout(300)  # loader workers are forked processes: fail rather than hang
def test_loader_benchmark_reports_both_paths(loader, tmp_path):
    out = tmp_path / "loader.json"
    result = loader.main(["--clips", "4", "--seconds", "1", "--workers", "0", "1", "--batch", "2", "--cores", "16",
                          "--step-rate", "10", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert {(r["examples"], r["decode"], r["workers"]) for r in rows} == {
        (kind, decode, workers) for kind in ("pretrain", "finetune") for decode in ("all", "window")
        for workers in (0, 1)}
    for row in rows:
        assert row["samples"] == 4 and row["samples_per_s"] > 0 and row["samples_per_cpu_s"] > 0
        assert row["projected_samples_per_s"] == pytest.approx(16 * row["samples_per_cpu_s"])
        assert row["device_ms_per_sample"] > 0  # device_batch ran, timed apart from the loader
        assert row["times_step_rate"] == pytest.approx(row["samples_per_s"] / 10)


def test_mixing_benchmark_shows_the_buffer_breaking_up_repeated_batches():
    rows = load_benchmark("mixing").main(["--labels", "2", "--per-label", "32", "--shard-size", "16", "--buffers",
                                          "0", "64", "--batch", "4", "--epochs", "3"])
    none, full = rows
    assert abs(none["top_class"] - none["uniform_top_class"]) < 0.1  # random shards: labels mix without a buffer
    assert none["repeat_pairs_x_uniform"] > 3 * full["repeat_pairs_x_uniform"]  # but partners repeat every epoch
    assert none["buffer_mb_8s_clips"] == 0 < full["buffer_mb_8s_clips"]


def test_folds_benchmark_reads_the_stages_epoch_lines():
    """benchmarks/folds.py times epochs from the progress lines the stage prints (behind Ray's worker prefix)."""
    folds = load_benchmark("folds")
    line = "(RayTrainWorker pid=1) " + progress_line("crema-d fold 3", 11, 50, {"train/loss": 1.2, "val/uar": 0.5})
    assert folds.EPOCH_LINE.search(line).groups() == ("3", "12", "50")
    busy, total = folds.cpu_times()
    assert 0 < busy < total


def test_startup_benchmark_times_phases_from_the_commands_own_processes(tmp_path):
    """benchmarks/startup.py, whose runs take minutes: the stamps its sitecustomize writes in a real process, the
    phases a run's stamps give (adding up to the command's time), and its import table."""
    startup = load_benchmark("startup")
    stamps = tmp_path / "stamps.jsonl"
    env = {**os.environ, startup.STAMPS: str(stamps),
           "PYTHONPATH": os.pathsep.join([str(startup.write_hooks(tmp_path / "hooks")), str(BENCHMARKS.parent)])}
    wrapped = ("import pipeline.train.pretrain as p, pipeline.train.loop as l, preprocessing.ray_runtime as r\n"
               "assert all(f.__wrapped__ for f in (p.stage_pretrain, l.fit, l.TrainStep.__call__, r.start_ray))\n"
               "import pipeline.tracking")
    subprocess.run([sys.executable, "-c", wrapped], env=env, check=True, timeout=120)
    events = [json.loads(line)["event"] for line in stamps.read_text().splitlines()]
    assert events == ["python", "stage_module_imported", "tracking_import_begin", "mlflow_import_begin",
                      "mlflow_imported", "tracking_imported", "atexit_last"]

    times = {"stage_module_imported": 2, "stage_begin": 2, "mlflow_import_begin": 2.1, "mlflow_imported": 2.5,
             "tracking_import_begin": 2.5, "tracking_imported": 3,
             "mlflow_setup_begin": 3, "mlflow_setup_end": 4, "start_ray_begin": 4, "start_ray_end": 9,
             "ray_started": 9, "trainer_fit_begin": 10, "trainer_fit_end": 31, "stage_end": 32, "atexit_first": 32.1,
             "atexit_last": 34}
    run = [{"t": 0.1, "pid": 0, "event": "python"}]  # the command, which forks the stage's process (pid 1)
    run += [{"t": t, "pid": 1, "event": event} for event, t in times.items()]
    for pid, fit, step in ((2, 20, 25), (3, 21, 25.1)):  # two ranks: the first step is the earliest
        run += [{"t": t, "pid": pid, "event": event} for event, t in (
            ("python", fit - 5), ("worker_fit_begin", fit), ("step_begin", step), ("step_end", 26),
            ("worker_fit_end", 30 + pid / 10))]
    phases = startup.phases(sorted(run, key=lambda e: e["t"]), began=0, ended=35)
    assert {name: round(phases[name], 6) for name in startup.PHASES} == {
        "imports": 2, "mlflow": 1.9, "ray": 5, "other": 1.1, "raytrain": 15, "first_step": 1, "rest": 9}
    assert sum(phases[name] for name in startup.PHASES) == pytest.approx(phases["total"]) == 35
    assert phases["fit_return"] == pytest.approx(0.7) and phases["finalise"] == 1 and phases["processes"] == 3

    [row] = startup.import_times([BENCHMARKS.parent], ["pipeline.tracking"], runs=1)
    assert row["wall"] > row["packages"]["mlflow"] > 0
    assert row["packages"]["scipy.stats"] == row["packages"]["sklearn"] == 0  # pipeline.metrics imports them in use


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


def test_train_step_benchmark_counts_ops_by_phase(train_step, tmp_path):
    """--count-ops: the phases add up to the step, and the device transforms do not grow with the batch."""
    out = tmp_path / "ops.json"
    small = train_step.main(["--tiny", "--sizes", "hicmae_tiny", "--count-ops", "--json", str(out), *TINY_BATCHES])
    assert json.loads(out.read_text())["op_counts"] == small["op_counts"]
    large = train_step.main(["--tiny", "--sizes", "hicmae_tiny", "--count-ops", "--pretrain-batch", "16",
                             "--finetune-batch", "16"])
    for few, many in zip(small["op_counts"], large["op_counts"], strict=True):
        assert (few["stage"], few["batch"], many["batch"], few["fused_adamw"]) == (many["stage"], 2, 16, True)
        for row in (few, many):
            assert row["transforms"] + row["forward_backward"] + row["optimizer"] == row["total"]
            assert row["forward_backward"] > 1000  # a backward through every block
            assert 0 < row["optimizer"] < 100      # fused AdamW: a few ops per parameter group, not per parameter
        assert 0 < few["transforms"] == many["transforms"] <= 40  # every clip of the batch at once
        assert few["optimizer"] == many["optimizer"]


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
    from pipeline.train.compiled import autocast

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


def test_jpeg_benchmark_decodes_training_frames(tmp_path):
    out = tmp_path / "jpeg.json"
    result = load_benchmark("jpeg_decode").main(["--batch", "8", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["batch"] == 8 and 1_000 < result["jpeg_bytes_mean"] < 50_000  # 160 x 160 q90 face crops
    opencv = result["decoders"]["opencv"]
    assert opencv["images_per_s"] > 0 and opencv["cpu_ms_per_image"] > 0
    for name in set(result["decoders"]) - {"opencv"}:  # torchvision's decoders, where it is installed
        assert result["decoders"][name]["max_abs_diff"] <= 64


def test_gpu_script_stops_at_its_budget(tmp_path):
    """benchmarks/gpu.sh runs its benchmarks in order within the budget; with none left it skips them all."""
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), str(tmp_path), "0"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, check=True)
    skipped = [line.split()[1].rstrip(":") for line in (tmp_path / "gpu.log").read_text().splitlines()
               if line.endswith("skipped, out of time")]
    assert skipped == ["step-eager", "loader-pretrain", "loader-finetune", "numerics", "jpeg", "step-best",
                       "step-compile", "step-accum", "step-accum-graphs"], done.stdout
