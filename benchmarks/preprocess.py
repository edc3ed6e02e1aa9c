"""Preprocessing throughput: clips/s and seconds per stage, next to decode-only time of the same clips.

    .venv/bin/python benchmarks/preprocess.py [--manifest M.jsonl] [--clips 12 --seconds 3 --size 480x360]

Without a manifest it builds talking-face clips (the astronaut photo, espeak-ng speech, h264/aac mp4) in a
temporary folder. Decode-only is the time to decode each clip's video at the output frame rate and its audio
at 16 kHz (the least any preprocessing must do); the full run is ``preprocess`` in one process (no Ray), so
both numbers use one worker. ``--ray`` also times the Ray Data run with its default workers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from preprocessing.decode import decode_audio, decode_video  # noqa: E402
from preprocessing.manifest import ClipRecord, DatasetInfo, read_manifest, write_manifest  # noqa: E402
from preprocessing.run import preprocess  # noqa: E402
from preprocessing.settings import PreprocessSettings  # noqa: E402


def build_clips(folder: Path, count: int, seconds: float, size: tuple[int, int], fps: int) -> Path:
    """Write ``count`` demo clips and their manifest; returns the manifest path."""
    from media import speech_wav, write_clip

    speech = speech_wav(folder / "speech.wav", "Kids are talking by the door, dogs are sitting by the door")
    clips = []
    for i in range(count):
        write_clip(folder / f"clip{i:03d}.mp4", seconds=seconds, size=size, fps=fps, speech=speech)
        clips.append(ClipRecord(clip_id=f"clip{i:03d}", video=f"clip{i:03d}.mp4"))
    info = DatasetInfo(name="bench", task="unlabelled", root=str(folder))
    return write_manifest(folder / "bench.jsonl", info, clips)


def decode_only(manifest: Path, settings: PreprocessSettings) -> float:
    """Seconds to decode every clip's video (at settings.fps) and audio, nothing else."""
    info, clips = read_manifest(manifest)
    start = time.perf_counter()
    for clip in clips:
        video_path = Path(info.root) / clip.video
        video, origin = decode_video(video_path, settings.fps, clip.start, clip.end, settings.max_short_side)
        decode_audio(Path(info.root) / (clip.audio or clip.video), origin, video.duration)
    return time.perf_counter() - start


def report(manifest: Path, out: Path, use_ray: bool, detect_every: int) -> None:
    settings = PreprocessSettings(use_ray=False, progress=False, detect_every=detect_every)
    _, clips = read_manifest(manifest)
    decode_only(manifest, settings)  # warm the page cache and imports
    decode_seconds = decode_only(manifest, settings)
    summary = preprocess(manifest, out / "single", settings)
    total = summary["wall_seconds_now"]
    print(f"clips: {len(clips)} ({summary['ok']} ok)")
    print(f"decode only (1 process):   {decode_seconds:7.2f} s  {len(clips) / decode_seconds:6.2f} clips/s")
    print(f"full preprocess (1 process): {total:5.2f} s  {len(clips) / total:6.2f} clips/s  "
          f"= {total / decode_seconds:.2f}x decode-only")
    for stage, seconds in summary["stage_seconds"].items():
        print(f"  {stage:<11} {seconds:7.2f} s  {100 * seconds / total:5.1f} %")
    if use_ray:
        ray_summary = preprocess(manifest, out / "ray", PreprocessSettings(progress=False,
                                                                            detect_every=detect_every))
        wall = ray_summary["wall_seconds_now"]
        print(f"full preprocess (Ray Data, default workers, incl. Ray start): {wall:.2f} s  "
              f"{len(clips) / wall:.2f} clips/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, help="an existing manifest (default: build demo clips)")
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", default="480x360", help="WIDTHxHEIGHT of the demo clips")
    parser.add_argument("--source-fps", type=int, default=30)
    parser.add_argument("--detect-every", type=int, default=1, help="run the face detector on every n-th frame")
    parser.add_argument("--ray", action="store_true", help="also time the Ray Data run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hicmae-bench-") as folder:
        folder = Path(folder)
        manifest = args.manifest
        if manifest is None:
            width, height = (int(v) for v in args.size.split("x"))
            manifest = build_clips(folder / "media", args.clips, args.seconds, (width, height), args.source_fps)
        report(manifest, folder / "out", args.ray, args.detect_every)


if __name__ == "__main__":
    main()
