"""The embedded demo dataset: a small, synthetic, offline audio-visual "emotion" dataset, and its adapter.

It is shaped like a real benchmark (a folder of talking-head mp4 clips and a label file) so the whole
pipeline can run anywhere in minutes. 10 speakers x 10 clips by default, 4 classes learnable from either
modality: the face (a real photograph restyled per speaker) moves differently per class
(``demo_faces``), and the espeak-ng speech has a different prosody per class (``demo_speech``).

    python -m preprocessing.datasets.demo --out data/demo/raw --seed 0

Expected layout::

    <root>/labels.csv               header ``clip,speaker,emotion``; one row per clip
    <root>/clips/<clip>.mp4         h264 video (25 fps, 256x256, 2.8 s) with aac mono audio

Assumptions:
- ``emotion`` is one of neutral, happy, angry, sad (label indices in that order).
- Folds: the sorted speakers in 5 contiguous blocks (10 speakers -> 2 per fold), speaker-disjoint.
- The same seed gives the same label file bytes and clip list; mp4 bytes may differ across encoder
  versions.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.datasets._layout import LayoutChecker, block_fold, finish
from preprocessing.datasets.demo_faces import random_look, random_motion, render_frames
from preprocessing.datasets.demo_speech import SENTENCES, random_voice, synthesise
from preprocessing.fileio import atomic_path, atomic_write_text
from preprocessing.manifest import ClipRecord, DatasetInfo

NAME = "demo"
CLASSES = ["neutral", "happy", "angry", "sad"]
NUM_FOLDS = 5
FPS = 25
DURATION = 2.8
SIZE = (256, 256)  # height, width
LABEL_FILE = "labels.csv"
CLIP_DIR = "clips"


@dataclass(frozen=True)
class ClipPlan:
    """Everything needed to render one clip, fixed before any rendering (so the label file is too)."""

    clip: str
    speaker: str
    speaker_index: int
    emotion: str
    sentence: str
    index: int


def plan_clips(seed: int, speakers: int, clips_per_speaker: int) -> list[ClipPlan]:
    """The clip list: classes cycle over all clips (balanced overall), shuffled within each speaker."""
    rng = np.random.default_rng(seed)
    plans = []
    for s in range(speakers):
        order = rng.permutation(clips_per_speaker)
        for k in range(clips_per_speaker):
            emotion = CLASSES[(s * clips_per_speaker + int(order[k])) % len(CLASSES)]
            plans.append(ClipPlan(clip=f"spk{s + 1:02d}_{k + 1:03d}", speaker=f"spk{s + 1:02d}",
                                  speaker_index=s, emotion=emotion,
                                  sentence=SENTENCES[int(rng.integers(len(SENTENCES)))], index=len(plans)))
    return plans


def labels_csv(plans: list[ClipPlan]) -> str:
    """The label file's text (``clip,speaker,emotion``), byte-identical for the same plans."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["clip", "speaker", "emotion"])
    writer.writerows([plan.clip, plan.speaker, plan.emotion] for plan in plans)
    return buffer.getvalue()


def write_mp4(path: Path, frames: list[np.ndarray], audio: np.ndarray, rate: int) -> None:
    """Encode RGB frames (h264, yuv420p, ``FPS``) and mono float audio (aac) into one mp4, atomically."""
    import av

    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=FPS, options={"preset": "veryfast", "crf": "20"})
        video.height, video.width = frames[0].shape[:2]
        video.pix_fmt = "yuv420p"
        sound = container.add_stream("aac", rate=rate, layout="mono")
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        chunk = 1024
        for start in range(0, len(audio), chunk):
            piece = av.AudioFrame.from_ndarray(audio[None, start:start + chunk], format="fltp", layout="mono")
            piece.sample_rate, piece.pts = rate, start
            container.mux(sound.encode(piece))
        container.mux(sound.encode())


def render_clip(plan: ClipPlan, seed: int, out_dir: Path) -> None:
    """Render and write one clip; its randomness depends only on (seed, speaker) and (seed, clip)."""
    look = random_look(np.random.default_rng([seed, 1, plan.speaker_index]))
    voice = random_voice(plan.speaker_index, np.random.default_rng([seed, 2, plan.speaker_index]))
    rng = np.random.default_rng([seed, 3, plan.index])
    count = int(round(DURATION * FPS))
    frames = render_frames(look, random_motion(plan.emotion, rng), SIZE, FPS, count, rng)
    audio, rate = synthesise(voice, plan.emotion, plan.sentence, DURATION)
    write_mp4(out_dir / CLIP_DIR / f"{plan.clip}.mp4", frames, audio, rate)


def _render_star(args: tuple[ClipPlan, int, Path]) -> None:
    render_clip(*args)


def generate_demo(out_dir: Path, seed: int = 0, speakers: int = 10, clips_per_speaker: int = 10,
                  workers: int | None = None) -> list[ClipPlan]:
    """Write the demo dataset to ``out_dir`` (see the module docstring) and return its clip plans."""
    if speakers < NUM_FOLDS:
        raise ValueError(f"the demo needs at least {NUM_FOLDS} speakers for its folds, got {speakers}")
    out_dir = Path(out_dir)
    (out_dir / CLIP_DIR).mkdir(parents=True, exist_ok=True)
    plans = plan_clips(seed, speakers, clips_per_speaker)
    workers = workers or min(len(plans), os.cpu_count() or 1)
    jobs = [(plan, seed, out_dir) for plan in plans]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_render_star, jobs, chunksize=4))
    else:
        for job in jobs:
            _render_star(job)
    atomic_write_text(out_dir / LABEL_FILE, labels_csv(plans))
    return plans


def build_manifest(root: Path) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Read a generated demo folder and return the dataset info and its clips."""
    check = LayoutChecker(NAME, root, __doc__)
    check.require(LABEL_FILE, CLIP_DIR)
    rows = check.read_csv(LABEL_FILE, ["clip", "speaker", "emotion"])
    check.check_empty(f"label rows with an emotion outside {CLASSES}",
                      [row for row in rows if row["emotion"] not in CLASSES])
    check.check_empty("labelled clips without their mp4",
                      [f"{CLIP_DIR}/{r['clip']}.mp4" for r in rows
                       if not (check.root / CLIP_DIR / f"{r['clip']}.mp4").is_file()])
    speakers = sorted({row["speaker"] for row in rows})
    check.check_empty(f"fewer than {NUM_FOLDS} speakers for {NUM_FOLDS} speaker-disjoint folds",
                      [] if len(speakers) >= NUM_FOLDS else [check.root / LABEL_FILE])
    block = math.ceil(len(speakers) / NUM_FOLDS)
    clips = [ClipRecord(clip_id=row["clip"], video=f"{CLIP_DIR}/{row['clip']}.mp4",
                        label=CLASSES.index(row["emotion"]), speaker=row["speaker"],
                        fold=block_fold(speakers.index(row["speaker"]), block, NUM_FOLDS)) for row in rows]
    info = DatasetInfo(name=NAME, task="classification", classes=CLASSES,
                       num_folds=NUM_FOLDS, protocol="5 speaker-disjoint folds: sorted speakers in blocks")
    return finish(info, clips)


def main(argv: list[str] | None = None) -> int:
    """CLI: generate the demo dataset."""
    parser = argparse.ArgumentParser(prog="python -m preprocessing.datasets.demo",
                                     description="Generate the embedded demo dataset.")
    parser.add_argument("--out", type=Path, default=Path("data/demo/raw"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speakers", type=int, default=10)
    parser.add_argument("--clips-per-speaker", type=int, default=10)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    plans = generate_demo(args.out, args.seed, args.speakers, args.clips_per_speaker, args.workers)
    print(f"demo: {len(plans)} clips of {args.speakers} speakers -> {args.out} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
