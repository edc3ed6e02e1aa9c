"""Crop agreement of sparser face detection (``detect_every``) with detection on every frame.

    .venv/bin/python benchmarks/face_track.py [--demo data/demo/raw] [--demo-clips 25] [--every 2 3 4]

Sources: clips of the demo dataset (``--demo-clips`` spread over the folder's sorted clips; a small demo is
generated when the folder does not exist) and real-face clips from tests/media.py (the astronaut photo
drifting, at three frame sizes). The detector runs once on every frame of a clip; for ``detect_every k``
the frames that ``detect_frames`` would examine keep their detections, and the track is filled and smoothed
as preprocessing does. Per frame, the distance is measured between where the two settings' crops put the
same points (the crop's corners and centre, taken from one crop into the frame and into the other crop), in
pixels of the 160-pixel crop. Printed: mean, 95th percentile and maximum over all frames, per source and k;
for scale, the same for every-frame tracks without smoothing (the detector's own frame-to-frame noise).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from preprocessing.decode import decode_video  # noqa: E402
from preprocessing.face import CROP_SIZE, crop_transform  # noqa: E402
from preprocessing.face_detect import FaceDetector, detect_frames  # noqa: E402
from preprocessing.face_tracks import main_track_geometry  # noqa: E402
from preprocessing.settings import PreprocessSettings  # noqa: E402

# The crop's corners and centre, crop pixels: (5, 2).
POINTS = np.array([[0, 0], [CROP_SIZE, 0], [0, CROP_SIZE], [CROP_SIZE, CROP_SIZE], [CROP_SIZE / 2] * 2])


class Replay:
    """A stand-in detector that answers frame index t with the detections recorded for frame t."""

    def __init__(self, detections: list[np.ndarray]):
        self.detections = detections

    def detect(self, t: int, **_) -> np.ndarray:
        return self.detections[t]


def crop_distance(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """reference, other: (T, 10) geometry. Returns (T,) mean distance in crop pixels between the crops."""
    distances = []
    for a, b in zip(reference, other, strict=True):
        to_frame = np.linalg.inv(np.vstack([crop_transform(a).astype(np.float64), [0, 0, 1]]))[:2]
        in_frame = POINTS @ to_frame[:, :2].T + to_frame[:, 2]
        to_other = crop_transform(b).astype(np.float64)
        moved = in_frame @ to_other[:, :2].T + to_other[:, 2]
        distances.append(np.linalg.norm(moved - POINTS, axis=1).mean())
    return np.array(distances)


def source_clips(demo: Path, demo_clips: int, folder: Path) -> dict[str, list[Path]]:
    """{source name: clip paths}: demo clips (generated when ``demo`` is missing) and tests/media clips."""
    from media import write_clip

    from preprocessing.datasets.demo import generate_demo

    if not (demo / "clips").is_dir():
        demo = folder / "demo"
        generate_demo(demo, speakers=5, clips_per_speaker=max(1, demo_clips // 5))
    clips = sorted((demo / "clips").glob("*.mp4"))
    picked = [clips[i] for i in np.linspace(0, len(clips) - 1, min(demo_clips, len(clips))).round().astype(int)]
    media = [write_clip(folder / f"astronaut_{w}x{h}.mp4", seconds=3.0, size=(w, h))
             for w, h in [(480, 360), (320, 240), (640, 360)]]
    return {"demo": picked, "tests/media.py": media}


def agreement(paths: list[Path], detector: FaceDetector, settings: PreprocessSettings,
              every: list[int]) -> dict[str, np.ndarray]:
    """Per-frame crop distances to every-frame detection: {label: (frames,)} over all ``paths``."""
    found: dict[str, list[np.ndarray]] = {}
    for path in paths:
        video, _ = decode_video(path, settings.fps, max_short_side=settings.max_short_side)
        recorded = detect_frames(detector, video.frames)
        reference, _ = main_track_geometry(recorded, smooth_frames=settings.smooth_frames)
        indices = np.arange(len(recorded))
        unsmoothed, _ = main_track_geometry(recorded, smooth_frames=1)
        found.setdefault("every frame, unsmoothed", []).append(crop_distance(reference, unsmoothed))
        for k in every:
            geometry, _ = main_track_geometry(detect_frames(Replay(recorded), indices, k),
                                              smooth_frames=settings.smooth_frames)
            found.setdefault(f"detect_every {k}", []).append(crop_distance(reference, geometry))
    return {label: np.concatenate(parts) for label, parts in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("data/demo/raw"), help="a generated demo folder")
    parser.add_argument("--demo-clips", type=int, default=25, help="demo clips to use, spread over all")
    parser.add_argument("--every", type=int, nargs="+", default=[2, 3, 4], help="detect_every values")
    args = parser.parse_args()
    settings = PreprocessSettings()
    print(f"crop distance to every-frame detection, pixels of the {CROP_SIZE}-pixel crop: mean / p95 / max")
    with tempfile.TemporaryDirectory(prefix="hicmae-track-") as folder, \
            FaceDetector.from_settings(settings) as detector:
        for source, paths in source_clips(args.demo, args.demo_clips, Path(folder)).items():
            results = agreement(paths, detector, settings, args.every)
            frames = len(next(iter(results.values())))
            print(f"{source} ({len(paths)} clips, {frames} frames)")
            for label, distances in results.items():
                print(f"  {label:<26} {distances.mean():5.2f} / {np.percentile(distances, 95):5.2f} / "
                      f"{distances.max():5.2f}")


if __name__ == "__main__":
    main()
