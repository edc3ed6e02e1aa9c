"""Preprocessing throughput: clips/s and seconds per stage, next to decode-only time of the same clips.

    .venv/bin/python benchmarks/preprocess.py [--manifest M.jsonl] [--clips 12 --seconds 3 --size 480x360]
                                              [--face-px N] [--repeats 5] [--detect-every N]
                                              [--face-detection short_range] [--ray]

Without a manifest it builds talking-face clips (the astronaut photo, espeak-ng speech, h264/aac mp4) in a
temporary folder: the head filling most of the frame, or with ``--face-px`` a face that many pixels wide (e.g.
28 in ``--size 1280x720``: a distant face, which full range on tiles finds). Decode-only is the time to decode
each clip's video at the output frame rate and its audio at 16 kHz (the least any preprocessing must do); the
full run is ``preprocess`` in one process (no Ray), so both numbers use one worker. The two alternate
``--repeats`` times after one warm-up of each (the first full run imports mediapipe and loads the detector:
printed as the cold start), so both see the same machine load; the ratio is taken per repetition and reported
as median and range, in wall time and in CPU time (the process's CPU seconds, all threads: less sensitive to
other jobs on a shared machine). ``--ray`` also times the Ray Data run with its default workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from preprocessing.clip import STAGES  # noqa: E402
from preprocessing.decode import decode_audio, decode_video  # noqa: E402
from preprocessing.manifest import ClipRecord, DatasetInfo, read_manifest, write_manifest  # noqa: E402
from preprocessing.run import preprocess  # noqa: E402
from preprocessing.settings import PreprocessSettings  # noqa: E402


def build_clips(folder: Path, count: int, seconds: float, size: tuple[int, int], fps: int,
                face_px: float | None = None) -> Path:
    """Write ``count`` demo clips and their manifest; returns the manifest path."""
    from media import Portrait, scene, speech_wav, write_clip

    speech = speech_wav(folder / "speech.wav", "Kids are talking by the door, dogs are sitting by the door")
    frames = scene([Portrait("astronaut", face_px, 0.4, 0.5, drift=0.02)]) if face_px else None
    clips = []
    for i in range(count):
        write_clip(folder / f"clip{i:03d}.mp4", seconds=seconds, size=size, fps=fps, speech=speech, frames=frames)
        clips.append(ClipRecord(clip_id=f"clip{i:03d}", video=f"clip{i:03d}.mp4"))
    info = DatasetInfo(name="bench", task="unlabelled")
    return write_manifest(folder / "bench.jsonl", info, clips)


def measured(work) -> tuple[float, float, object]:
    """Run ``work()``; returns (wall seconds, CPU seconds of this process, its result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def decode_only(manifest: Path, settings: PreprocessSettings) -> int:
    """Decode every clip's video (at settings.fps) and audio, nothing else; returns the frame count."""
    _, clips = read_manifest(manifest)
    frames = 0
    for clip in clips:
        video_path = manifest.parent / clip.video
        video, origin = decode_video(video_path, settings.fps, clip.start, clip.end, settings.max_short_side)
        decode_audio(manifest.parent / (clip.audio or clip.video), origin, video.duration)
        frames += len(video.frames)
    return frames


def full_run(manifest: Path, out: Path, settings: PreprocessSettings) -> dict:
    """One ``preprocess`` of the manifest into a fresh ``out``; returns its summary."""
    shutil.rmtree(out, ignore_errors=True)
    return preprocess(manifest, out, manifest.parent, settings)


def spread(values: list[float], unit: str = "s", digits: int = 2) -> str:
    return f"{np.median(values):.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def load_average() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def report(manifest: Path, out: Path, repeats: int, use_ray: bool, detect_every: int, face_detection: str) -> None:
    settings = PreprocessSettings(use_ray=False, progress=False, detect_every=detect_every,
                                  face_detection=face_detection)
    _, clips = read_manifest(manifest)
    print(f"load average (1/5/15 min) before: {load_average()}; {os.cpu_count()} CPUs")
    _, _, frames = measured(lambda: decode_only(manifest, settings))  # warm the page cache and imports
    cold, _, _ = measured(lambda: full_run(manifest, out / "single", settings))
    runs = []
    for _ in range(repeats):
        decode_wall, decode_cpu, _ = measured(lambda: decode_only(manifest, settings))
        full_wall, full_cpu, summary = measured(lambda: full_run(manifest, out / "single", settings))
        runs.append({"decode_wall": decode_wall, "decode_cpu": decode_cpu, "full_wall": full_wall,
                     "full_cpu": full_cpu, "stages": summary["run"]["stage_seconds"], "ok": summary["ok"],
                     "face": summary.get("face")})
    print(f"load average (1/5/15 min) after:  {load_average()}")
    column = {key: [run[key] for run in runs] for key in runs[0]}
    full = column["full_wall"]
    print(f"clips: {len(clips)} ({runs[0]['ok']} ok), {frames} output frames; detect_every {detect_every}; "
          f"face detection {face_detection}; median (min-max) of {repeats} alternating repetitions")
    print(f"faces: {runs[-1]['face']}")
    print(f"decode only (1 process):     {spread(column['decode_wall'])}  "
          f"{len(clips) / np.median(column['decode_wall']):6.2f} clips/s")
    print(f"full preprocess (1 process): {spread(full)}  {len(clips) / np.median(full):6.2f} clips/s  "
          f"(cold first run: {cold:.2f} s)")
    wall_ratio = np.array(full) / np.array(column["decode_wall"])
    cpu_ratio = np.array(column["full_cpu"]) / np.array(column["decode_cpu"])
    print(f"full / decode-only, wall:    {spread(list(wall_ratio), 'x')}")
    print(f"full / decode-only, CPU:     {spread(list(cpu_ratio), 'x')}")
    for stage in STAGES:
        seconds = [run["stages"][stage] for run in runs]
        print(f"  {stage:<11} {spread(seconds)}  {1000 * np.median(seconds) / frames:5.2f} ms/frame  "
              f"{100 * np.median(seconds) / np.median(full):5.1f} %")
    if use_ray:
        ray_settings = PreprocessSettings(progress=False, detect_every=detect_every, face_detection=face_detection)
        wall, _, _ = measured(lambda: full_run(manifest, out / "ray", ray_settings))
        print(f"full preprocess (Ray Data, default workers, incl. Ray start): {wall:.2f} s  "
              f"{len(clips) / wall:.2f} clips/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, help="an existing manifest (default: build demo clips)")
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", default="480x360", help="WIDTHxHEIGHT of the demo clips")
    parser.add_argument("--source-fps", type=int, default=30)
    parser.add_argument("--face-px", type=float, help="a face this many pixels wide (default: a close-up)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating decode-only/full repetitions")
    parser.add_argument("--detect-every", type=int, default=PreprocessSettings().detect_every,
                        help="run the face detector on every n-th frame")
    parser.add_argument("--face-detection", default=PreprocessSettings().face_detection,
                        choices=["short_then_full_range", "short_range"], help="the face detection setting")
    parser.add_argument("--ray", action="store_true", help="also time the Ray Data run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hicmae-bench-") as folder:
        folder = Path(folder)
        manifest = args.manifest
        if manifest is None:
            width, height = (int(v) for v in args.size.split("x"))
            manifest = build_clips(folder / "media", args.clips, args.seconds, (width, height), args.source_fps,
                                   args.face_px)
        report(manifest, folder / "out", args.repeats, args.ray, args.detect_every, args.face_detection)


if __name__ == "__main__":
    main()
