"""Training-step throughput of pre-training and fine-tuning: samples/s, peak memory, FLOPs per sample and MFU.

    .venv/bin/python benchmarks/train_step.py                          # every size, reference batches (GPU)
    .venv/bin/python benchmarks/train_step.py --sizes hicmae_base --best-batch --compile
    .venv/bin/python benchmarks/train_step.py --tiny --steps 10        # a few seconds on a CPU
    .venv/bin/python benchmarks/train_step.py --tiny --check-numerics  # bf16 vs float32 losses
    .venv/bin/python benchmarks/train_step.py --tiny --count-ops       # aten ops per step, by phase
    .venv/bin/python benchmarks/train_step.py --tiny --accum-steps 4   # 4 micro-batches of each batch per step

The step is the training loops' own ``training.TrainStep`` with the stage's task (pipeline/pretrain.py,
pipeline/finetune.py): forward with every loss, backward, AdamW from ``build_optimizer`` at the peak learning
rate, under ``training.autocast``, compiled as ``scaling.compile`` would (``--compile MODE``). Inputs are
synthetic batches as the loader delivers them, with the reference's shapes (16 x 160 x 160 uint8 video with its
crop, flip and erasing; 256 x 128 log-mel), masks (tube 0.9, random 0.8) and fine-tuning recipe (Mixup/CutMix,
label smoothing, drop path 0.1, layer decay), made once in host memory (pinned on a GPU). Each timed step moves
one to the device as the training loop does (``video_batch.device_batch``: the video is cast, normalised, cropped
and augmented there), so the figures include that and exclude the data loader (benchmarks/loader.py).

samples/s is batch x micro-batches / median step time over ``--steps`` steps after ``--warmup`` steps, timed with
CUDA events on a GPU (perf_counter on a CPU). ``--accum-steps A`` makes each step A micro-batches of ``batch``
(``scaling.accum_steps``: the same per-GPU batch, an A times larger global batch), each moved to the device as the
loop moves it, one at a time; the peak memory is then that of the micro-batch, the gradients accumulated. FLOPs
per sample are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward + backward on the meta device
(where attention decomposes into counted matmuls; on a CPU the fused attention kernel is not counted) and checked
against ``analytic_flops``. MFU = achieved FLOP/s / peak, the peak being a bf16 ``--peak-size``^3 matmul measured in
the same run (float32 on a CPU).

``--count-ops`` times nothing: it counts the aten ops one step dispatches (``pipeline.train.op_count``, a proxy for
kernel launches that needs no GPU), after one warm-up step, split into the device transforms (``device_batch``),
the optimizer (what runs inside ``optimizer.step()``: AdamW, fused as on a GPU unless ``--fused-adamw off``) and
forward + backward (the rest of the stage's ``train_step``: forward with the losses, backward, gradient clipping,
the returned losses). Counted on a CPU, the host-to-device copies of a GPU do not show (a few ops per step).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import HiCMAEClassifier, HiCMAEConfig, HiCMAEPretrain, random_mask, tube_mask  # noqa: E402
from pipeline.config.training import FinetuneSettings, ModelSettings, PretrainSettings  # noqa: E402
from pipeline.data.augment import AugmentConfig, train_video_fields  # noqa: E402
from pipeline.data.loaders import collate  # noqa: E402
from pipeline.data.video_batch import device_batch, video_fields  # noqa: E402
from pipeline.data.windows import multi_scale_crop  # noqa: E402
from pipeline.train import finetune_fold as finetune  # noqa: E402
from pipeline.train import pretrain  # noqa: E402
from pipeline.train.compiled import resolve  # noqa: E402
from pipeline.train.loop import TrainingTask, TrainStep, step_module  # noqa: E402
from pipeline.train.op_count import OpCounter  # noqa: E402
from pipeline.train.optim import build_optimizer, scaled_lrs, set_lr  # noqa: E402
from preprocessing.manifest import DatasetInfo  # noqa: E402

STAGES = ("pretrain", "finetune")
NUM_CLASSES = 6  # CREMA-D's
INFO = DatasetInfo(name="synthetic", task="classification", classes=[f"c{i}" for i in range(NUM_CLASSES)])
# HiCMAE-T's structure shrunk until a step takes milliseconds on a CPU (inputs 32 x 32 x 4 frames, 64 x 32 log-mel).
TINY = {"img_size": 32, "num_frames": 4, "audio_frames": 64, "audio_mel_bins": 32, "embed_dim": 32, "num_heads": 2,
        "audio_embed_dim": 32, "audio_num_heads": 2, "fusion_num_heads": 2, "depth": 2, "audio_depth": 2,
        "fusion_depth": 1, "hierarchy_layers": [0, 1], "decoder_embed_dim": 16, "decoder_num_heads": 1,
        "decoder_depth": 3, "audio_decoder_embed_dim": 16, "audio_decoder_num_heads": 1, "audio_decoder_depth": 3}


# ----------------------------------------------------------------------------------------------------------------
# The step under test.


def stage_settings(stage: str, size: str, overrides: dict) -> PretrainSettings | FinetuneSettings:
    """The schema's defaults (the paper's settings) for ``stage`` with the model ``size`` and overrides."""
    model = ModelSettings(size=size, overrides=overrides)
    return PretrainSettings(model=model) if stage == "pretrain" else FinetuneSettings(model=model)


def model_config(settings: PretrainSettings | FinetuneSettings) -> HiCMAEConfig:
    """The model config as the training loop builds it (fine-tuning adds its drop path)."""
    if isinstance(settings, FinetuneSettings):
        return settings.model.build_config(drop_path_rate=settings.drop_path)
    return settings.model.build_config()


def build_model(stage: str, cfg: HiCMAEConfig) -> torch.nn.Module:
    return HiCMAEPretrain(cfg) if stage == "pretrain" else HiCMAEClassifier(cfg, NUM_CLASSES)


def loader_batch(stage: str, cfg: HiCMAEConfig, batch: int, rng: np.random.Generator) -> dict:
    """A batch as the loader delivers it (``pipeline.data.windows``), in host memory: random uint8 frames
    (B, T, S, S, 3) with the stage's geometry drawn as the loader draws it (pre-training's multi-scale crop;
    fine-tuning's resized crop, flip and erasing), random log-mel (B, 1, F, M), and masks or labels."""
    geometry_only = AugmentConfig(rand_augment=False, input_size=cfg.img_size)  # RandAugment: in the loader
    examples = []
    for _ in range(batch):
        frames = rng.integers(0, 256, (cfg.num_frames, cfg.img_size, cfg.img_size, 3), dtype=np.uint8)
        example = {"audio": rng.standard_normal((1, cfg.audio_frames, cfg.audio_mel_bins), dtype=np.float32)}
        if stage == "pretrain":
            example |= video_fields(frames, crop=multi_scale_crop(cfg.img_size, cfg.img_size, rng))
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            example["mask_video"] = tube_mask(1, cfg.video_grid, cfg.mask_ratio, generator)[0]
            example["mask_audio"] = random_mask(1, cfg.num_audio_tokens, cfg.audio_mask_ratio, generator)[0]
        else:
            example |= train_video_fields(frames, rng, geometry_only)
            example["label"] = int(rng.integers(NUM_CLASSES))
        examples.append(example)
    return collate(examples)


def pinned(batch: dict, device: torch.device) -> dict:
    """The batch in pinned host memory for a GPU (as the DataLoader pins it), else as it is."""
    return {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch


@dataclass
class Step:
    """One configured training step: ``train`` is the loop's ``TrainStep`` (micro-batches already on ``device``,
    each with ``rng``; returns the detached losses); ``run(batches)`` first moves each loader batch there, one at a
    time, as the training loop does."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train: TrainStep
    device: torch.device
    rng: np.random.Generator

    def run(self, batches: list[dict]) -> torch.Tensor:
        return self.train((device_batch(batch, self.device), self.rng) for batch in batches)


def stage_task(stage: str, settings, compile_mode: str, precision: str | None) -> TrainingTask:
    """The stage's own training task (its losses and host-side draws) for synthetic batches."""
    config = {"settings": settings.model_dump(mode="json"), "compile": compile_mode}
    if stage == "pretrain":
        task = pretrain.PretrainTask(config)
    else:
        task = finetune.FinetuneTask({**config, "info": INFO.model_dump(mode="json"), "split": {}, "clips": {}})
    task.compile_mode, task.precision = compile_mode, precision
    return task


def make_step(stage: str, settings, cfg: HiCMAEConfig, batch: int, device: torch.device, precision: str,
              fused_adamw: bool | None, compile_mode: str | None, seed: int, accum_steps: int = 1) -> Step:
    """The model on ``device`` (seeded init), its optimizer at the peak lr, and the training loops' own step
    (``training.TrainStep``: the stage's losses, compiled in ``compile_mode``, backward, AdamW)."""
    torch.manual_seed(seed)
    model = build_model(stage, cfg).to(device)
    mode = resolve(compile_mode or "none", device)
    optimizer = build_optimizer(model, settings.optim, fused=fused_adamw,
                                compiled=mode != "none" and device.type == "cuda")
    set_lr(optimizer, scaled_lrs(settings.optim, batch * accum_steps)[0])
    task = stage_task(stage, settings, mode, precision)
    task.accum_steps = accum_steps
    step = TrainStep(task, step_module(task, model, mode), optimizer, mode)
    return Step(model, optimizer, step, device, np.random.default_rng(seed))


# ----------------------------------------------------------------------------------------------------------------
# FLOPs.


def counted_flops(stage: str, settings, cfg: HiCMAEConfig, batch: int) -> int:
    """FLOPs of one forward + backward (the training step without the optimizer) counted on the meta device."""
    ready = device_batch(loader_batch(stage, cfg, batch, np.random.default_rng(0)), "cpu")
    tensors = {key: value.to("meta") for key, value in ready.items()}
    with torch.device("meta"):
        model = build_model(stage, cfg)
    # a zero-lr SGD stands in for AdamW (optimizers do elementwise work only, which is not counted)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, foreach=False)
    task = stage_task(stage, settings, "none", "fp32")
    step = TrainStep(task, step_module(task, model, "none"), optimizer, "none")
    counter = FlopCounterMode(display=False)
    with counter:
        step([(tensors, np.random.default_rng(0))])
    return counter.get_total_flops()


def _block(tokens: int, dim: int, mlp_ratio: float) -> int:
    """Forward matmul FLOPs of a ViT block's projections (qkv, proj, mlp) over ``tokens``, attention excluded."""
    return 2 * tokens * dim * dim * (4 + 2 * int(mlp_ratio))


def _attention(queries: int, keys: int, dim: int) -> int:
    """Forward FLOPs of softmax(QK^T)V: two (queries x keys x dim) matmuls."""
    return 4 * queries * keys * dim


def _cross(queries: int, dim: int, keys: int, context_dim: int) -> int:
    """Forward FLOPs of cross-attention: q and proj over queries, kv over the context, the attention."""
    return 4 * queries * dim * dim + 4 * keys * context_dim * dim + _attention(queries, keys, dim)


def _encoder(tokens: int, depth: int, dim: int, mlp_ratio: float) -> int:
    return depth * (_block(tokens, dim, mlp_ratio) + _attention(tokens, tokens, dim))


def _fusion(cfg: HiCMAEConfig, video: int, audio: int) -> int:
    cv, ca, r = cfg.embed_dim, cfg.audio_embed_dim, cfg.mlp_ratio
    layer = (_cross(video, cv, audio, ca) + _block(video, cv, r) + _attention(video, video, cv)
             + _cross(audio, ca, video, cv) + _block(audio, ca, r) + _attention(audio, audio, ca))
    return cfg.fusion_depth * layer


def _decoder(cfg: HiCMAEConfig, tokens: int, visible: int, masked: int, enc_dim: int, dim: int, depth: int,
             out_dim: int) -> int:
    """Encoder-to-decoder projections (fused output + every level), the blocks (block i >= 1 cross-attends to
    a skip of ``visible`` tokens) and the head over the masked tokens."""
    levels = len(cfg.hierarchy_layers)
    flops = 2 * visible * enc_dim * dim * (1 + levels)
    flops += depth * (_block(tokens, dim, cfg.mlp_ratio) + _attention(tokens, tokens, dim))
    if cfg.decoder_skip_connections:
        flops += (depth - 1) * _cross(tokens, dim, visible, dim)
    return flops + 2 * masked * dim * out_dim


def analytic_flops(stage: str, cfg: HiCMAEConfig, batch: int) -> int:
    """Matmul FLOPs of one forward + backward for ``batch`` samples, counted by hand.

    Backward costs twice the forward (input and weight gradients), except the patch embeddings, whose input
    needs no gradient (weight gradient only: once the forward). Elementwise work (norms, softmax, GELU, losses,
    AdamW) is not counted.
    """
    n_v, n_a = cfg.num_video_tokens, cfg.num_audio_tokens
    cv, ca = cfg.embed_dim, cfg.audio_embed_dim
    embed = 2 * n_v * cfg.video_patch_dim * cv + 2 * n_a * cfg.audio_patch_dim * ca
    if stage == "pretrain":
        vis_v, vis_a = n_v - cfg.num_video_masked, n_a - cfg.num_audio_masked
        body = (_encoder(vis_v, cfg.depth, cv, cfg.mlp_ratio) + _encoder(vis_a, cfg.audio_depth, ca, cfg.mlp_ratio)
                + _fusion(cfg, vis_v, vis_a)
                + _decoder(cfg, n_v, vis_v, cfg.num_video_masked, cv, cfg.decoder_embed_dim, cfg.decoder_depth,
                           cfg.video_patch_dim)
                + _decoder(cfg, n_a, vis_a, cfg.num_audio_masked, ca, cfg.audio_decoder_embed_dim,
                           cfg.audio_decoder_depth, cfg.audio_patch_dim))
        per_batch = 2 * batch * batch * cv * len(cfg.hierarchy_layers)  # contrastive similarity matrices
        return batch * (2 * embed + 3 * body) + 3 * per_batch
    body = (_encoder(n_v, cfg.depth, cv, cfg.mlp_ratio) + _encoder(n_a, cfg.audio_depth, ca, cfg.mlp_ratio)
            + _fusion(cfg, n_v, n_a)
            + 2 * (cfg.depth * cv + cfg.audio_depth * ca)            # softmax(w)-weighted mean of the layers
            + 2 * 2 * (cv + ca) * NUM_CLASSES)                       # head
    return batch * (2 * embed + 3 * body)


# ----------------------------------------------------------------------------------------------------------------
# Timing.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Step, batches: list[dict], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` steps after ``warmup`` steps, cycling through ``batches``."""
    for i in range(warmup):
        step.run(batches[i % len(batches)])
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for i, (start, end) in enumerate(events):
            start.record()
            step.run(batches[i % len(batches)])
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1000 for start, end in events]
    times = []
    for i in range(steps):
        began = time.perf_counter()
        step.run(batches[i % len(batches)])
        times.append(time.perf_counter() - began)
    return times


def matmul_peak(device: torch.device, size: int, repeats: int = 10) -> float:
    """FLOP/s of a size^3 matmul (bf16 on a GPU, float32 on a CPU), median of ``repeats``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - began)
    return 2 * size**3 / statistics.median(times)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since the last reset: allocated GPU memory, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------------------------
# Cases.


@dataclass
class Options:
    device: torch.device
    precision: str
    fused_adamw: bool | None
    compile_mode: str | None
    warmup: int
    steps: int
    seed: int
    accum_steps: int = 1


def measure(stage: str, size: str, overrides: dict, batch: int, opts: Options, peak: float) -> dict:
    """One (stage, size, batch) case -> a result row; raises torch.OutOfMemoryError when it does not fit."""
    settings = stage_settings(stage, size, overrides)
    cfg = model_config(settings)
    release(opts.device)
    rng = np.random.default_rng(opts.seed)
    accum = opts.accum_steps
    batches = [[pinned(loader_batch(stage, cfg, batch, rng), opts.device) for _ in range(accum)] for _ in range(2)]
    step = make_step(stage, settings, cfg, batch, opts.device, opts.precision, opts.fused_adamw,
                     opts.compile_mode, opts.seed, accum)
    try:
        times = time_steps(step, batches, opts.warmup, opts.steps, opts.device)
        memory = peak_memory_gb(opts.device)
    finally:
        del step, batches
        release(opts.device)
    median = statistics.median(times)
    flops = counted_flops(stage, settings, cfg, batch) / batch
    samples = batch * accum
    return {"stage": stage, "size": size, "batch": batch, "accum_steps": accum, "precision": opts.precision,
            "compile": opts.compile_mode or "off", "fused_adamw": opts.fused_adamw,
            "samples_per_s": samples / median, "step_ms": 1000 * median,
            "step_ms_p10_p90": [1000 * float(np.percentile(times, q)) for q in (10, 90)],
            "peak_memory_gb": memory, "gflop_per_sample": flops / 1e9,
            "analytic_gflop_per_sample": analytic_flops(stage, cfg, batch) / batch / 1e9,
            "tflops": flops * samples / median / 1e12, "mfu": flops * samples / median / peak}


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def best_batch(stage: str, size: str, overrides: dict, start: int, max_batch: int, opts: Options,
               peak: float) -> list[dict]:
    """Rows for batch start, 2 start, 4 start, ... up to ``max_batch``, until memory runs out or throughput
    stops growing (below the best so far)."""
    rows, batch = [], start
    while batch <= max_batch:
        try:
            row = measure(stage, size, overrides, batch, opts, peak)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            release(opts.device)
            print(f"  {stage} {size} batch {batch}: out of memory", flush=True)
            break
        print_row(row)
        rows.append(row)
        if row["samples_per_s"] < max(r["samples_per_s"] for r in rows):
            break
        batch *= 2
    if rows:
        max(rows, key=lambda r: r["samples_per_s"])["best_batch"] = True
    return rows


def print_row(row: dict) -> None:
    accum = f" x {row['accum_steps']}" if row.get("accum_steps", 1) > 1 else ""
    print(f"  {row['stage']:<8} {row['size']:<13} batch {row['batch']:>4}{accum}  "
          f"{row['samples_per_s']:9.1f} samples/s  step {row['step_ms']:8.1f} ms  mem {row['peak_memory_gb']:6.2f} GB  "
          f"{row['gflop_per_sample']:7.2f} GFLOP/sample  {row['tflops']:7.2f} TFLOP/s  MFU {100 * row['mfu']:5.1f} %",
          flush=True)


def loss_curve(stage: str, size: str, overrides: dict, batch: int, steps: int, precision: str,
               device: torch.device, seed: int) -> list[float]:
    """Training losses of ``steps`` steps from a fixed seed, init and data, in ``precision``."""
    settings = stage_settings(stage, size, overrides)
    cfg = model_config(settings)
    rng = np.random.default_rng(seed)
    step = make_step(stage, settings, cfg, batch, device, precision, None, None, seed)
    torch.manual_seed(seed)  # drop path draws the same way in both runs
    losses = []
    for _ in range(steps):
        loss = step.run([loader_batch(stage, cfg, batch, rng)])
        losses.append(float(loss.reshape(-1)[0]))
    return losses


def check_numerics(stage: str, size: str, overrides: dict, batch: int, steps: int, device: torch.device,
                   seed: int) -> dict:
    """bf16 against float32 losses over the first ``steps`` steps: the largest relative difference."""
    fp32 = loss_curve(stage, size, overrides, batch, steps, "fp32", device, seed)
    bf16 = loss_curve(stage, size, overrides, batch, steps, "bf16", device, seed)
    relative = [abs(b - f) / abs(f) for b, f in zip(bf16, fp32, strict=True)]
    return {"stage": stage, "size": size, "batch": batch, "steps": steps, "loss_fp32": fp32, "loss_bf16": bf16,
            "max_relative_difference": max(relative)}


# ----------------------------------------------------------------------------------------------------------------
# Op counts.


def count_step_ops(step: Step, batch: dict) -> dict:
    """Aten ops of one step on a loader batch (``step.run``), by phase: ``transforms`` (``device_batch``),
    ``optimizer`` (inside ``optimizer.step()``: AdamW) and ``forward_backward`` (the rest of the stage's
    ``train_step``: forward with the losses, backward, gradient clipping, the returned losses)."""
    counter = OpCounter()
    marks = {}

    def mark(name: str) -> Callable:
        def hook(*_) -> None:
            marks[name] = counter.ops
        return hook

    hooks = [step.optimizer.register_step_pre_hook(mark("optimizer")),
             step.optimizer.register_step_post_hook(mark("optimized"))]
    try:
        with counter:
            ready = device_batch(batch, step.device)
            marks["transforms"] = counter.ops
            step.train([(ready, step.rng)])
    finally:
        for hook in hooks:
            hook.remove()
    optimizer = marks["optimized"] - marks["optimizer"]
    return {"transforms": marks["transforms"], "forward_backward": counter.ops - marks["transforms"] - optimizer,
            "optimizer": optimizer, "total": counter.ops}


def op_count_row(stage: str, size: str, overrides: dict, batch: int, opts: Options) -> dict:
    """One (stage, size, batch) case counted on ``opts.device`` after ``opts.warmup`` steps (one is enough: AdamW
    creates its state in its first). AdamW is fused unless ``opts.fused_adamw`` is False: what a GPU runs."""
    settings = stage_settings(stage, size, overrides)
    cfg = model_config(settings)
    loaded = loader_batch(stage, cfg, batch, np.random.default_rng(opts.seed))
    fused = opts.fused_adamw is not False
    step = make_step(stage, settings, cfg, batch, opts.device, opts.precision, fused, None, opts.seed)
    for _ in range(opts.warmup):
        step.run([loaded])
    counts = count_step_ops(step, loaded)
    return {"stage": stage, "size": size, "batch": batch, "precision": opts.precision, "fused_adamw": fused,
            **counts}


OP_COUNT_COLUMNS = "  stage    size          batch  transforms  forward+backward  optimizer   total"


def print_op_counts(row: dict) -> None:
    print(f"  {row['stage']:<8} {row['size']:<13} {row['batch']:>5}  {row['transforms']:>10}  "
          f"{row['forward_backward']:>16}  {row['optimizer']:>9}  {row['total']:>6}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Entry point.


def parse_overrides(items: list[str]) -> dict:
    """``["depth=2", "hierarchy_layers=[0, 1]"]`` -> model field overrides (values parsed as YAML)."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
        key, text = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(text)
    return overrides


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["hicmae_tiny", "hicmae_small", "hicmae_base"])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--tiny", action="store_true", help="shrink every model and input (for CPUs and tests)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", help="HiCMAEConfig overrides")
    parser.add_argument("--pretrain-batch", type=int, default=PretrainSettings().batch_size)
    parser.add_argument("--finetune-batch", type=int, default=FinetuneSettings().batch_size)
    parser.add_argument("--best-batch", action="store_true",
                        help="also double the batch until memory runs out or throughput stops growing")
    parser.add_argument("--max-batch", type=int, default=1024 if cuda else 64)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16" if cuda else "fp32",
                        help="autocast precision (default: as the training loops, bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="compile the step as the stages do (scaling.compile: default, reduce-overhead = CUDA "
                             "graphs, max-autotune)")
    parser.add_argument("--fused-adamw", choices=("auto", "on", "off"), default="auto",
                        help="auto: fused on GPU, as the training loops")
    parser.add_argument("--accum-steps", type=int, default=1,
                        help="micro-batches of the batch per step (scaling.accum_steps: gradient accumulation)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--peak-size", type=int, default=8192 if cuda else 1024, help="matmul side for the peak")
    parser.add_argument("--check-numerics", action="store_true",
                        help="instead of timing: bf16 vs float32 losses of the first --numerics-steps steps")
    parser.add_argument("--numerics-steps", type=int, default=20)
    parser.add_argument("--count-ops", action="store_true",
                        help="instead of timing: aten ops dispatched per step, by phase (no GPU needed)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = {**(TINY if args.tiny else {}), **parse_overrides(args.set)}
    batches = {"pretrain": args.pretrain_batch, "finetune": args.finetune_batch}
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(["benchmarks/train_step.py", *argv]),
              "overrides": overrides}
    if args.check_numerics:
        result["numerics"] = []
        for size in args.sizes:
            for stage in args.stages:
                row = check_numerics(stage, size, overrides, batches[stage], args.numerics_steps, device, args.seed)
                print(f"  {stage:<8} {size:<13} batch {row['batch']}: {row['steps']} steps, bf16 vs float32 loss: "
                      f"max relative difference {100 * row['max_relative_difference']:.3f} %", flush=True)
                result["numerics"].append(row)
    elif args.count_ops:
        opts = Options(device, args.dtype, {"auto": None, "on": True, "off": False}[args.fused_adamw],
                       compile_mode=None, warmup=1, steps=1, seed=args.seed)
        print(f"aten ops per training step on {device.type} ({args.dtype}, "
              f"{'foreach' if opts.fused_adamw is False else 'fused'} AdamW):\n{OP_COUNT_COLUMNS}", flush=True)
        result["op_counts"] = []
        for size in args.sizes:
            for stage in args.stages:
                row = op_count_row(stage, size, overrides, batches[stage], opts)
                print_op_counts(row)
                result["op_counts"].append(row)
    else:
        opts = Options(device, args.dtype, {"auto": None, "on": True, "off": False}[args.fused_adamw],
                       args.compile, args.warmup, args.steps, args.seed, args.accum_steps)
        peak = matmul_peak(device, args.peak_size)
        result["peak_tflops"] = peak / 1e12
        result["peak_dtype"] = "bf16" if device.type == "cuda" else "float32"
        print(f"{result['device']}: {result['peak_dtype']} {args.peak_size}^3 matmul {peak / 1e12:.2f} TFLOP/s",
              flush=True)
        result["rows"] = []
        for size in args.sizes:
            for stage in args.stages:
                if args.best_batch:
                    result["rows"] += best_batch(stage, size, overrides, batches[stage], args.max_batch, opts, peak)
                else:
                    row = measure(stage, size, overrides, batches[stage], opts, peak)
                    print_row(row)
                    result["rows"].append(row)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
