"""Training data throughput: samples per CPU second from shards to batched examples, and on to the device.

    .venv/bin/python benchmarks/loader.py                                  # synthetic 8 s clips, 0 1 2 workers
    .venv/bin/python benchmarks/loader.py --workers 8 16 --step-rate 1500  # on a 16-core GPU machine
    .venv/bin/python benchmarks/loader.py --processed data/demo/processed  # real preprocessed shards

The data path is the training loops' own (pipeline/data.py), with ``num_workers`` DataLoader workers and pinned
memory on a GPU, then ``video_batch.device_batch`` as the training loop calls it: pre-training streams the shards
(``ClipStream``, the default shuffle buffer) into the pre-training example maker (random window, multi-scale crop
box, masks); fine-tuning reads the clips by index in the epoch's permutation (``ClipDataset``,
``GlobalBatchSampler``) into the fine-tuning one (window, RandAugment, the draws of resized crop, flip and
erasing). Each clip gives one example; every worker count reads all the clips.

The loader's figure is samples per CPU second of the main process and the workers without ``device_batch``, whose
work (cast, normalisation, crop, resize, flip, erasing) runs on the training device: on a GPU machine the CPU
cores do the rest, so ``--cores`` x that figure is what such a machine delivers (16 by default). ``device_batch``
is timed on its own (ms per sample, on ``--device``; on a CPU it is CPU work of the training process).

``decode all`` is the former path (every frame of a clip decoded before its window is cut, as
``decode_sample`` without ``lazy`` does); ``decode window`` is the current one (only the 16 frames the
window uses). Without ``--processed`` the shards are synthetic: a face photo drifting across the frame, JPEG q90
like preprocessing writes, random log-mel, at 25 fps, ``--seconds`` long (VoxCeleb2 clips average ~8 s).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.training import FinetuneSettings, PretrainSettings  # noqa: E402
from pipeline.data.loaders import (  # noqa: E402
    ClipDataset,
    ClipStream,
    clip_catalog,
    stream_loader,
    training_loader,
    verified_shards,
)
from pipeline.data.sampling import GlobalBatchSampler  # noqa: E402
from pipeline.data.video_batch import device_batch  # noqa: E402
from pipeline.data.windows import finetune_train_examples, pretrain_examples  # noqa: E402
from preprocessing.shard_index import ShardIndex, shard_file, write_shard  # noqa: E402
from preprocessing.shards import META_FIELD, ClipSample, encode_sample  # noqa: E402

FPS, FBANK_RATE, SIDE = 25, 100, 160
EXAMPLES = ("pretrain", "finetune")
DECODES = ("all", "window")


# ----------------------------------------------------------------------------------------------------------------
# Synthetic shards.


def face_frames(count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, 160, 160, 3) uint8: the astronaut's face, drifting a few pixels per frame, with sensor noise."""
    from skimage.data import astronaut

    photo = astronaut()                                                   # (512, 512, 3) RGB
    dx, dy = rng.integers(-3, 4, size=(2, count)).cumsum(axis=1).clip(-40, 40)
    frames = np.empty((count, SIDE, SIDE, 3), np.uint8)
    for t in range(count):
        top, left = 20 + 40 + dy[t], 150 + 40 + dx[t]
        crop = photo[top:top + 200, left:left + 200]
        frames[t] = cv2.resize(crop, (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    noise = rng.normal(0, 2, frames.shape)
    return np.clip(frames + noise, 0, 255).astype(np.uint8)


def build_shards(folder: Path, clips: int, seconds: float, per_shard: int = 32, seed: int = 0) -> Path:
    """Write ``clips`` synthetic labelled clips as shards under ``folder/shards``; returns ``folder``."""
    rng = np.random.default_rng(seed)
    frames = face_frames(round(seconds * FPS), rng)
    fbank = rng.normal(-5, 2, (round(seconds * FBANK_RATE), 128)).astype(np.float32)
    encoded = encode_sample(frames, fbank, {"key": "clip"})       # every clip shares the encoded frames
    samples = []
    for i in range(clips):
        meta = {"key": f"clip{i:05d}", "clip_id": f"clip{i:05d}", "label": i % 6, "fps": FPS,
                "fbank_rate": FBANK_RATE, "num_frames": len(frames), "duration": seconds}
        samples.append({**encoded, "__key__": meta["key"], META_FIELD: json.dumps(meta).encode()})
    for shard, start in enumerate(range(0, clips, per_shard)):
        write_shard(shard_file(folder, shard), samples[start:start + per_shard])
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Measurement.


def decode_all_first(make_examples, clip: ClipSample, epoch: int) -> list[dict]:
    """The former data path: every frame of the clip decoded, then the examples cut from them."""
    return make_examples(replace(clip, frames=clip.frames[:]), epoch)


def example_maker(kind: str, decode: str):
    """The training loop's example function for ``kind`` (the schema's default settings)."""
    if kind == "pretrain":
        settings = PretrainSettings()
        make = partial(pretrain_examples, window=settings.window, cfg=settings.model.build_config(),
                       seed=settings.seed)
    else:
        settings = FinetuneSettings()
        make = partial(finetune_train_examples, window=settings.window, augment=settings.augment,
                       seed=settings.seed)
    return partial(decode_all_first, make) if decode == "all" else make


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the loader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def own_cpu_seconds() -> float:
    """CPU time of this process alone (all its threads)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def training_data(shards: list[ShardIndex], kind: str, decode: str, workers: int, batch: int):
    """One epoch's DataLoader of one rank, as the training stage builds it."""
    make = example_maker(kind, decode)
    if kind == "pretrain":
        stream = ClipStream([shard.path for shard in shards], make, rank=0, world_size=1,
                            shuffle_buffer=PretrainSettings().shuffle_buffer, seed=0)
        return stream_loader(stream, batch, workers)
    dataset = ClipDataset(list(clip_catalog(shards).values()), make)
    return training_loader(dataset, GlobalBatchSampler(num_clips=len(dataset), batch_size=batch, rank=0,
                                                       world_size=1, seed=0), workers)


def measure(shards: list[ShardIndex], kind: str, decode: str, workers: int, batch: int, device: torch.device) -> dict:
    """One pass over the shards (worker start-up included), every batch through ``device_batch``: samples per CPU
    second of the loader (main process and workers, ``device_batch`` excluded), samples/s (wall, everything) and
    the milliseconds ``device_batch`` takes per sample (CPU time on a CPU device, wall time on a GPU)."""
    loader = training_data(shards, kind, decode, workers, batch)
    samples, device_cpu, device_wall = 0, 0.0, 0.0
    began, cpu_began = time.perf_counter(), cpu_seconds()
    for tensors in loader:  # the workers are joined when the pass ends
        wall, cpu = time.perf_counter(), own_cpu_seconds()
        tensors = device_batch(tensors, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        device_wall, device_cpu = device_wall + time.perf_counter() - wall, device_cpu + own_cpu_seconds() - cpu
        samples += len(tensors["video"])
    seconds, cpu = time.perf_counter() - began, cpu_seconds() - cpu_began
    device_ms = (device_cpu if device.type == "cpu" else device_wall) / samples * 1000
    return {"examples": kind, "decode": decode, "workers": workers, "batch": batch, "samples": samples,
            "seconds": seconds, "samples_per_s": samples / seconds, "cpu_seconds": cpu - device_cpu,
            "samples_per_cpu_s": samples / (cpu - device_cpu), "device_ms_per_sample": device_ms}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processed", type=Path, help="a preprocessed dataset folder (default: synthetic shards)")
    parser.add_argument("--clips", type=int, default=64, help="synthetic clips")
    parser.add_argument("--seconds", type=float, default=8.0, help="synthetic clip length")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--examples", nargs="+", choices=EXAMPLES, default=list(EXAMPLES))
    parser.add_argument("--decode", nargs="+", choices=DECODES, default=list(DECODES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of this process (1: as a Ray Train worker holding one CPU; workers: 1)")
    parser.add_argument("--cores", type=int, default=16, help="CPU cores of the GPU machine to project to")
    parser.add_argument("--step-rate", type=float, help="training samples/s to compare with (benchmarks/train_step)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def run(processed: Path, args: argparse.Namespace) -> dict:
    shards = verified_shards(processed, "preprocess the dataset again")
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "cores": args.cores,
              "threads": args.threads,
              "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "shards": len(shards), "rows": []}
    for kind in args.examples:
        for decode in args.decode:
            for workers in args.workers:
                row = measure(shards, kind, decode, workers, args.batch, device)
                row["projected_samples_per_s"] = row["samples_per_cpu_s"] * args.cores
                if args.step_rate:
                    row["times_step_rate"] = row["samples_per_s"] / args.step_rate
                print(f"  {kind:<8} decode {decode:<6} {workers:>2} workers: {row['samples_per_s']:8.1f} samples/s  "
                      f"{row['samples_per_cpu_s']:6.1f} samples per CPU s (x {args.cores} cores: "
                      f"{row['projected_samples_per_s']:6.0f}/s)  device {row['device_ms_per_sample']:.2f} ms/sample"
                      + (f"  = {row['times_step_rate']:.2f}x the step rate" if args.step_rate else ""), flush=True)
                result["rows"].append(row)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as folder:
            processed = args.processed or build_shards(Path(folder), args.clips, args.seconds)
            if not args.processed:
                print(f"{args.clips} synthetic {args.seconds:g} s clips ({round(args.seconds * FPS)} frames each)",
                      flush=True)
            result = run(processed, args)
    finally:
        torch.set_num_threads(threads)
    result["source"] = str(args.processed) if args.processed else f"synthetic {args.clips} x {args.seconds:g} s"
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
