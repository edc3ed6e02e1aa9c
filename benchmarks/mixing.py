"""How well pre-training's streamed batches mix, against the memory of the clip shuffle buffer.

    .venv/bin/python benchmarks/mixing.py                          # 800 clips sorted by label, shards of 64
    .venv/bin/python benchmarks/mixing.py --buffers 0 64 256 --workers 2

A synthetic dataset whose manifest sorts by label (as RAVDESS's file names sort by emotion and VoxCeleb2's by
speaker) is written the way preprocessing writes shards (``plan_units`` puts the clips into shards in a seeded
random order). ``ClipStream`` then reads it for several epochs with each buffer size, through the loader the
pre-training stage builds, and the figures are:

- ``top class``: the mean share of a batch held by its most frequent label, next to uniform sampling's;
- ``repeat pairs``: of the pairs of clips that share a batch in one epoch, the share that share one again in the
  next, as a multiple of uniform sampling's (1.0 = no memory of the last epoch's batches);
- ``buffer MB``: the packed clips the buffer spans per loader worker at 8 s clips (VoxCeleb2's mean; views of the
  memory-mapped shards, of which only the decoded windows' pages are read), from the measured
  bytes of a packed clip (JPEG q90 frames at 25 fps and a float16 log-mel at 100 frames/s).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.loaders import ClipStream, stream_loader, verified_shards  # noqa: E402
from preprocessing.manifest import ClipRecord, DatasetInfo  # noqa: E402
from preprocessing.settings import PreprocessSettings  # noqa: E402
from preprocessing.shard_index import shard_file, write_shard  # noqa: E402
from preprocessing.shards import META_FIELD, encode_sample  # noqa: E402
from preprocessing.units import plan_units  # noqa: E402


def audio_only(clip, epoch: int) -> list[dict]:
    """The clip's number (its fbank's value) as the only field: the mixing needs nothing else."""
    return [{"audio": clip.fbank[:1, :1]}]


def write_sorted_dataset(folder: Path, labels: int, per_label: int, shard_size: int) -> list[int]:
    """Clips whose ids sort by label, sharded as preprocessing shards them; returns each clip number's label."""
    clips = [ClipRecord(clip_id=f"{label:03d}-{i:05d}", video="x.mp4", label=label)
             for label in range(labels) for i in range(per_label)]
    info = DatasetInfo(name="sorted", task="classification", classes=[str(k) for k in range(labels)])
    frames = np.zeros((1, 16, 16, 3), np.uint8)
    for unit in plan_units(info, clips, PreprocessSettings(shard_size=shard_size)):
        samples = []
        for clip in unit.clips:
            number = clips.index(clip)
            meta = {"key": f"k{number:06d}", "clip_id": clip.clip_id, "label": clip.label, "fps": 25,
                    "fbank_rate": 100}
            samples.append({**encode_sample(frames, np.full((1, 128), number, np.float32), meta),
                            META_FIELD: json.dumps(meta).encode()})
        write_shard(shard_file(folder, unit.index), samples)
    return [clip.label for clip in clips]


def packed_clip_megabytes(seconds: float = 8.0) -> float:
    """Bytes of one packed 8 s clip: 200 JPEG q90 face crops (a real face photo) and its float16 log-mel."""
    from skimage.data import astronaut

    face = cv2.resize(astronaut()[20:300, 110:340], (160, 160), interpolation=cv2.INTER_AREA)
    jpeg = len(cv2.imencode(".jpg", face, [cv2.IMWRITE_JPEG_QUALITY, 90])[1])
    return (seconds * 25 * jpeg + seconds * 100 * 128 * 2) / 2**20


def epochs_of_batches(folder: Path, buffer: int, workers: int, batch: int, epochs: int) -> list[list[list[int]]]:
    stream = ClipStream([s.path for s in verified_shards(folder, "")], audio_only, rank=0, world_size=1,
                        shuffle_buffer=buffer, seed=0)
    loader = stream_loader(stream, batch, workers)
    result = []
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        result.append([np.rint(b["audio"][:, 0, 0].numpy()).astype(int).tolist() for b in loader])
    return result


def top_class_share(batches, labels: np.ndarray) -> float:
    return float(np.mean([np.bincount(labels[b]).max() / len(b) for b in batches]))


def pairs(batches) -> set[tuple[int, int]]:
    return {pair for b in batches for pair in itertools.combinations(sorted(b), 2)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--per-label", type=int, default=100)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--buffers", type=int, nargs="+", default=[0, 16, 64, 256, 1024])
    parser.add_argument("--workers", type=int, default=1, help="loader workers (each has its own buffer)")
    parser.add_argument("--batch", type=int, default=40, help="per rank (the reference's 40)")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    megabytes = packed_clip_megabytes()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        labels = np.array(write_sorted_dataset(Path(folder), args.labels, args.per_label, args.shard_size))
        count = len(labels)
        rng = np.random.default_rng(0)
        uniform = [rng.permutation(count)[i:i + args.batch].tolist() for i in range(0, count - args.batch + 1,
                                                                                     args.batch)] * 20
        uniform_share = top_class_share(uniform, labels)
        uniform_repeat = (args.batch - 1) / (count - 1)  # chance that a batch partner shares a batch again
        print(f"{count} clips, {args.labels} labels sorted, shards of {args.shard_size}, batch {args.batch}, "
              f"{args.workers} loader worker(s); uniform sampling: top class {uniform_share:.3f}")
        for buffer in args.buffers:
            epochs = epochs_of_batches(Path(folder), buffer, args.workers, args.batch, args.epochs)
            share = top_class_share([b for epoch in epochs for b in epoch], labels)
            repeats = [len(pairs(a) & pairs(b)) / max(len(pairs(a)), 1) for a, b in itertools.pairwise(epochs)]
            row = {"buffer": buffer, "top_class": share, "uniform_top_class": uniform_share,
                   "repeat_pairs_x_uniform": float(np.mean(repeats)) / uniform_repeat,
                   "buffer_mb_8s_clips": buffer * megabytes}
            rows.append(row)
            print(f"  buffer {buffer:>5} clips: top class {share:.3f}, "
                  f"repeat pairs {row['repeat_pairs_x_uniform']:5.2f}x uniform, "
                  f"buffer {row['buffer_mb_8s_clips']:7.0f} MB per loader worker", flush=True)
    return rows


if __name__ == "__main__":
    main()
