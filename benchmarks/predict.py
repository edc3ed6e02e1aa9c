"""Single-video prediction time: a talking-face clip through ``pipeline.predict.predict`` on the CPU.

    .venv/bin/python benchmarks/predict.py [--seconds 10 --size 640x480] [--model demo|hicmae_base] [--repeats 3]
                                           [--preview preview.mp4]

Builds the clip (the astronaut photo, espeak-ng speech, h264/aac mp4) and exports a randomly initialised model
(``demo``: the demo model of params.yaml; or a registered size) in a temporary folder, then runs ``predict``
``--repeats`` times after one warm-up, printing the median wall time per stage (decode, detect, align_crop,
fbank, model, ...) and the total in wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from model import HiCMAEClassifier, get_config  # noqa: E402
from pipeline.config import PROJECT_ROOT, load_params  # noqa: E402
from pipeline.export import export_model  # noqa: E402
from pipeline.predict import predict  # noqa: E402
from pipeline.settings import training_params  # noqa: E402
from preprocessing.manifest import DatasetInfo  # noqa: E402

CLASSES = ["neutral", "happy", "angry", "sad"]


def build_model(name: str, folder: Path) -> Path:
    """Export a randomly initialised classifier: the demo model of params.yaml, or a registered size."""
    params = training_params(load_params(PROJECT_ROOT / "params.yaml"))
    cfg = params.finetune.model.build_config() if name == "demo" else get_config(name)
    info = DatasetInfo(name="benchmark", task="classification", classes=CLASSES)
    return export_model(HiCMAEClassifier(cfg, len(CLASSES)).state_dict(), cfg, info, {}, None, folder / "model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="640x480", help="video width x height")
    parser.add_argument("--model", default="demo", help="demo, hicmae_tiny, hicmae_small or hicmae_base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preview", help="also write this preview (.png or .mp4) every run")
    args = parser.parse_args()
    from media import speech_wav, write_clip

    with tempfile.TemporaryDirectory(prefix="hicmae-predict-bench-") as tmp:
        folder = Path(tmp)
        width, height = (int(v) for v in args.size.split("x"))
        speech = speech_wav(folder / "speech.wav", "The quick brown fox jumps over the lazy dog. " * 3)
        video = write_clip(folder / "clip.mp4", seconds=args.seconds, size=(width, height), speech=speech)
        model = build_model(args.model, folder)
        preview = folder / Path(args.preview).name if args.preview else None
        started = time.perf_counter()
        predict(video, model, preview=preview)
        print(f"{args.seconds:g} s clip, {width}x{height}, model {args.model}: cold start (imports done, detector "
              f"and model loaded the first time) {time.perf_counter() - started:.2f} s")
        runs = []
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            result = predict(video, model, preview=preview)
            runs.append({**result["timings"], "total wall": time.perf_counter() - wall,
                         "total CPU": time.process_time() - cpu})
        print(f"{len(result['windows'])} windows; median of {args.repeats} runs (seconds):")
        for stage in runs[0]:
            print(f"  {stage:12s} {np.median([run[stage] for run in runs]):7.3f}")


if __name__ == "__main__":
    main()
