"""JPEG decoding of training frames: OpenCV on the CPU (the loader's decoder) against nvJPEG on the GPU.

    .venv/bin/python benchmarks/jpeg_decode.py                  # CPU decoders only where no GPU is present
    python3 benchmarks/jpeg_decode.py --batch 640 --json out.json   # on a GPU machine with torchvision

The frames are the ones preprocessing writes: 160 x 160 face crops (the astronaut photo drifting across the
frame, ``benchmarks/loader.py``'s synthetic clip) encoded by ``preprocessing.shards.encode_frames`` (JPEG q90).
A pre-training batch of 40 windows holds 640 of them.

For each decoder: images per second (wall) and CPU milliseconds per image (this process, all threads), so the
CPU cores a GPU machine would save can be read off. ``opencv`` is ``PackedFrames.decode`` (``cv2.imdecode``, one
thread, as in a loader worker); ``torchvision-cpu`` is ``torchvision.io.decode_jpeg`` on the CPU; ``nvjpeg`` is
``decode_jpeg(list, device="cuda")``, one batched call per ``--batch`` images, timed to the end of the GPU's work.
Every decoder's output is compared with OpenCV's: the largest and mean absolute difference in grey levels
(decoders may round upsampled chroma differently).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loader import face_frames  # noqa: E402
from preprocessing.shards import PackedFrames, encode_frames  # noqa: E402


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(decode, repeats: int, count: int) -> tuple[dict, list[np.ndarray]]:
    """Run ``decode()`` (which decodes ``count`` images) ``repeats`` times after one warm-up: rates of the best."""
    frames = decode()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), own_cpu_seconds()
        decode()
        walls.append(time.perf_counter() - wall)
        cpus.append(own_cpu_seconds() - cpu)
    best = int(np.argmin(walls))
    return {"images_per_s": count / walls[best], "cpu_ms_per_image": 1000 * cpus[best] / count}, frames


def difference(frames: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """How far ``frames`` (H, W, 3) are from OpenCV's ``reference``, in grey levels."""
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(frames, reference, strict=True)]
    return {"max_abs_diff": int(max(d.max() for d in diffs)),
            "mean_abs_diff": float(np.mean([d.mean() for d in diffs]))}


def hwc(images: list[torch.Tensor]) -> list[np.ndarray]:
    """torchvision's (3, H, W) images, on any device -> (H, W, 3) arrays."""
    return [image.permute(1, 2, 0).cpu().numpy() for image in images]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=640, help="images per batched GPU call (40 windows x 16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    packed = PackedFrames(encode_frames(face_frames(args.batch, np.random.default_rng(0))))
    jpegs = [packed.blob[offset:offset + length] for offset, length in zip(packed.offsets, packed.lengths, strict=True)]
    result = {"batch": args.batch, "jpeg_bytes_mean": float(np.mean([len(j) for j in jpegs])),
              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "decoders": {}}

    row, reference = timed(lambda: [packed.decode(i) for i in range(len(packed))], args.repeats, args.batch)
    result["decoders"]["opencv"] = row
    try:
        from torchvision.io import decode_jpeg
    except Exception as error:  # noqa: BLE001 - any import failure means: no torchvision next to this torch
        result["torchvision"] = f"not importable: {error}"
        print(f"  torchvision: {result['torchvision']}", flush=True)
    else:
        tensors = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        row, frames = timed(lambda: [decode_jpeg(t) for t in tensors], args.repeats, args.batch)
        result["decoders"]["torchvision-cpu"] = row | difference(hwc(frames), reference)
        if torch.cuda.is_available():
            def on_gpu():
                images = decode_jpeg(tensors, device="cuda")
                torch.cuda.synchronize()
                return images
            row, frames = timed(on_gpu, args.repeats, args.batch)
            result["decoders"]["nvjpeg"] = row | difference(hwc(frames), reference)
    for name, row in result["decoders"].items():
        extra = f"  vs opencv: max {row['max_abs_diff']}, mean {row['mean_abs_diff']:.3f}" if "max_abs_diff" in row \
            else ""
        print(f"  {name:<16} {row['images_per_s']:10.0f} images/s  {row['cpu_ms_per_image']:7.3f} CPU ms/image{extra}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
