"""Prediction speed on this machine: many videos in one ``hicmae predict`` run (Ray Data) against one ``hicmae predict``
process per file, on the demo's clips, and where the time goes per clip; or one video's stages (``--single``).

    .venv/bin/python benchmarks/predict.py [--clips 100] [--per-file 10] [--workers 2] [--repeats 3] [--model demo]
    .venv/bin/python benchmarks/predict.py --single [--seconds 10 --size 640x480] [--repeats 3] [--preview p.mp4]

The comparison generates the demo dataset (``--clips`` of its 100 clips: 2.8 s, 256x256 h264/aac) and exports a
randomly initialised model (``demo``: the demo model of params.yaml; or a registered size) in a temporary folder.
Each repetition runs the per-file way on ``--per-file`` of the clips (evenly spread; a fresh process each, as
``hicmae predict CLIP --model M --out r.json --embeddings e.parquet``) and then the batch way on all ``--clips``
(``hicmae predict FOLDER --model M --out p.csv --embeddings e.parquet --workers N``, a fresh table each time), and
prints clips/s both ways (min and median over the repetitions; the batch figure includes starting Ray, and the
rate after its first committed row is given too), the median seconds per clip of each stage both ways, and the
largest difference between the two ways' probabilities and embeddings of the same clips.

``--single`` runs ``pipeline.predict.video.predict`` on one built clip (the astronaut photo, espeak-ng speech)
``--repeats`` times after a warm-up and prints the median wall time per stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from model import HiCMAEClassifier, get_config  # noqa: E402
from pipeline.config.params import PROJECT_ROOT, load_params  # noqa: E402
from pipeline.config.training import training_params  # noqa: E402
from pipeline.predict.table import EMBEDDINGS  # noqa: E402
from pipeline.predict.video import predict  # noqa: E402
from pipeline.train.export import export_model  # noqa: E402
from preprocessing.datasets.demo import CLASSES, CLIP_DIR, generate_demo  # noqa: E402
from preprocessing.manifest import DatasetInfo  # noqa: E402

HICMAE = [str(Path(sys.executable).with_name("hicmae"))]
BATCH_STAGES = ("decode", "detect", "align_crop", "fbank", "encode", "windows", "model")


def build_model(name: str, folder: Path) -> Path:
    """Export a randomly initialised classifier: the demo model of params.yaml, or a registered size."""
    params = training_params(load_params(PROJECT_ROOT / "params.yaml"))
    cfg = params.finetune.model.build_config() if name == "demo" else get_config(name)
    info = DatasetInfo(name="benchmark", task="classification", classes=CLASSES)
    return export_model(HiCMAEClassifier(cfg, len(CLASSES)).state_dict(), cfg, info, {}, None, folder / "model")


def read_parquet(path: Path) -> dict[str, dict]:
    import pyarrow.parquet as pq

    return {row["path"]: row for row in pq.read_table(path).to_pylist()}


def per_file(clips: list[Path], model: Path, work: Path) -> dict:
    """One ``hicmae predict`` process per clip: wall seconds each, their stage timings and outputs."""
    walls, stages, outputs = [], [], {}
    for clip in clips:
        out, embeddings = work / f"{clip.stem}.json", work / f"{clip.stem}.parquet"
        started = time.perf_counter()
        subprocess.run([*HICMAE, "predict", str(clip), "--model", str(model), "--out", str(out), "--embeddings",
                        str(embeddings)], check=True, capture_output=True)
        walls.append(time.perf_counter() - started)
        result = json.loads(out.read_text())
        timings = result["timings"]
        stages.append({**timings, "start, imports, detector, files": walls[-1] - sum(timings.values())})
        outputs[str(clip)] = {"probabilities": list(result["clip"]["probabilities"].values()),
                              **read_parquet(embeddings)[str(clip)]}
    return {"walls": walls, "stages": stages, "outputs": outputs}


def batch(folder: Path, model: Path, work: Path, workers: int) -> dict:
    """One ``hicmae predict`` run over the folder: wall seconds, when its first rows were committed (and how many),
    its rows and embeddings."""
    table = work / "predictions.jsonl"
    started = time.perf_counter()
    process = subprocess.Popen([*HICMAE, "predict", str(folder), "--model", str(model), "--out",
                                str(work / "predictions.csv"), "--embeddings", str(work / "embeddings.parquet"),
                                "--workers", str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first, first_rows = None, 0
    while process.poll() is None:
        if first is None and table.exists():
            first, first_rows = time.perf_counter() - started, len(table.read_text().splitlines())
        time.sleep(0.1)
    wall = time.perf_counter() - started
    if process.returncode:
        raise RuntimeError(f"hicmae predict failed:\n{process.stderr.read().decode()[-3000:]}")
    rows = [json.loads(line) for line in table.open()]
    if first is None:  # finished between two looks
        first, first_rows = wall, len(rows)
    return {"wall": wall, "first": first, "first_rows": first_rows, "rows": rows,
            "embeddings": read_parquet(work / "embeddings.parquet")}


def compare(clips: int, per_file_clips: int, workers: int, repeats: int, model_name: str) -> None:
    with tempfile.TemporaryDirectory(prefix="hicmae-predict-bench-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        generate_demo(folder / "raw", seed=0, speakers=10, clips_per_speaker=math.ceil(clips / 10))
        all_clips = sorted((folder / "raw" / CLIP_DIR).glob("*.mp4"))
        for extra in all_clips[clips:]:
            extra.unlink()
        videos = all_clips[:clips]
        sample = [videos[round(i)] for i in np.linspace(0, len(videos) - 1, min(per_file_clips, len(videos)))]
        model = build_model(model_name, folder)
        print(f"{len(videos)} demo clips generated in {time.perf_counter() - started:.0f} s; model {model_name}; "
              f"batch: {workers} CPU workers, 1 model worker; load average {os.getloadavg()[0]:.1f}", flush=True)
        singles, batches = [], []
        for repeat in range(repeats):
            singles.append(per_file(sample, model, Path(tempfile.mkdtemp(dir=tmp))))
            batches.append(batch(folder / "raw" / CLIP_DIR, model, Path(tempfile.mkdtemp(dir=tmp)), workers))
            rate_one = len(sample) / sum(singles[-1]["walls"])
            rate_many = len(videos) / batches[-1]["wall"]
            print(f"  repeat {repeat + 1}: per-file {rate_one:.3f} clips/s, batch {rate_many:.3f} clips/s "
                  f"({rate_many / rate_one:.1f}x); load average {os.getloadavg()[0]:.1f}", flush=True)
        report(videos, sample, singles, batches)


def report(videos: list[Path], sample: list[Path], singles: list[dict], batches: list[dict]) -> None:
    one = [len(sample) / sum(run["walls"]) for run in singles]
    many = [len(videos) / run["wall"] for run in batches]
    after = [(len(videos) - run["first_rows"]) / max(run["wall"] - run["first"], 1e-9) for run in batches]
    ratios = [m / o for m, o in zip(many, one, strict=True)]
    print(f"per-file: {len(sample)} processes a repetition, {np.median([w for r in singles for w in r['walls']]):.2f} s"
          f" each (median) -> {min(one):.3f} / {np.median(one):.3f} clips/s (min / median)")
    print(f"batch:    {len(videos)} clips a run in {np.median([r['wall'] for r in batches]):.1f} s (median), first "
          f"row after {np.median([r['first'] for r in batches]):.1f} s -> {min(many):.3f} / {np.median(many):.3f} "
          f"clips/s; after the first row {min(after):.3f} / {np.median(after):.3f} clips/s")
    print(f"speed-up: {min(ratios):.1f}x / {np.median(ratios):.1f}x (min / median)")
    print("median seconds per clip   per-file   batch (in its actors)")
    stages = list(dict.fromkeys([s for run in singles for t in run["stages"] for s in t] + list(BATCH_STAGES)))
    for stage in stages:
        single = [t.get(stage) for run in singles for t in run["stages"] if stage in t]
        many_stage = [row["seconds"].get(stage) for run in batches for row in run["rows"]
                      if row["status"] == "ok" and stage in row["seconds"]]
        print(f"  {stage:32s} {np.median(single) if single else float('nan'):8.3f}   "
              f"{np.median(many_stage) if many_stage else float('nan'):8.3f}")
    outputs, rows = singles[-1]["outputs"], {row["path"]: row for row in batches[-1]["rows"]}
    embeddings = batches[-1]["embeddings"]
    probability = max(np.abs(np.subtract(list(rows[path]["clip"]["probabilities"].values()),
                                         out["probabilities"])).max() for path, out in outputs.items())
    embedding = max(np.abs(np.subtract(embeddings[path][name], out[name])).max()
                    for path, out in outputs.items() for name in EMBEDDINGS if name in out)
    print(f"batch vs per-file on the same {len(outputs)} clips: max |difference| of probabilities {probability:.2e} "
          f"(both rounded to 1e-6), of embeddings {embedding:.2e}")


def single(args) -> None:
    """One clip through ``predict``: the median wall time per stage."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", action="store_true", help="one video's stages instead of the comparison")
    parser.add_argument("--clips", type=int, default=100, help="demo clips the batch run predicts")
    parser.add_argument("--per-file", type=int, default=10, help="clips predicted one process each")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPU workers of the batch run")
    parser.add_argument("--seconds", type=float, default=10.0, help="--single: the clip's length")
    parser.add_argument("--size", default="640x480", help="--single: video width x height")
    parser.add_argument("--model", default="demo", help="demo, hicmae_tiny, hicmae_small or hicmae_base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preview", help="--single: also write this preview (.png or .mp4) every run")
    args = parser.parse_args()
    if args.single:
        single(args)
    else:
        compare(args.clips, args.per_file, args.workers, args.repeats, args.model)


if __name__ == "__main__":
    main()
