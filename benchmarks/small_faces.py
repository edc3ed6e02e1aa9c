"""Small, distant faces: how often the face is found, where the crop lands, what it costs, by face size.

    .venv/bin/python benchmarks/small_faces.py [--sizes 20 24 28 32] [--short-sides 480 720] [--seconds 2]

Clips: the astronaut photo (tests/media.py) with its face ``size`` pixels wide in a 1280x720 frame, at four
places (centre-left, top-right, bottom-centre, top-left corner), drifting sideways by 2 % of the width, with
espeak-ng speech. Each is preprocessed as ``load_clip_media`` does (decoded to ``max_short_side`` lines), once
with the default detection (short range, then full range on tiles) and once with short range alone. Printed
per face size and short side: the share of frames whose face was detected, the largest and median distance from
a crop's centre to the true face centre (in face widths), the detection time per frame, and the crops' detail
(variance of the Laplacian of the grey crop, higher is sharper).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from preprocessing.clip import load_clip_media  # noqa: E402
from preprocessing.decode import MediaError  # noqa: E402
from preprocessing.face import crop_transform  # noqa: E402
from preprocessing.face_detect import FaceDetector  # noqa: E402
from preprocessing.settings import PreprocessSettings  # noqa: E402

HD = (1280, 720)
PLACES = [(0.3, 0.45), (0.75, 0.3), (0.5, 0.8), (0.1, 0.1)]


def crop_offsets(geometry: np.ndarray, centres: np.ndarray, face_px: float) -> np.ndarray:
    """(T,) distance from each crop's centre (mapped back into the frame) to the true face centre, face widths."""
    offsets = []
    for row, centre in zip(geometry, centres, strict=True):
        to_frame = np.linalg.inv(np.vstack([crop_transform(row).astype(np.float64), [0, 0, 1]]))
        offsets.append(np.linalg.norm((to_frame @ [80, 80, 1])[:2] - centre) / face_px)
    return np.array(offsets)


def measure(path: Path, portrait, settings: PreprocessSettings, detector: FaceDetector) -> dict:
    """One clip preprocessed: detected share, crop offsets, detection ms per frame, crop detail."""
    timings: dict[str, float] = {}
    try:
        media = load_clip_media(path, path, None, None, settings, detector, timings)
    except MediaError:
        return {"detected": 0.0, "offsets": np.array([np.nan]), "ms": np.nan, "detail": np.nan}
    height, width = media.video.frames.shape[1:3]
    scale = width / HD[0]
    centres = np.array([portrait.face_centre(width, height, t / settings.fps) for t in range(len(media.crops))])
    detail = np.mean([cv2.Laplacian(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for crop in media.crops])
    return {"detected": media.face.detected / len(media.crops),
            "offsets": crop_offsets(media.geometry, centres, portrait.face_px * scale),
            "ms": 1000 * timings["detect"] / len(media.crops), "detail": detail}


def row(size: float, short_side: int, detection: str, found: list[dict]) -> str:
    """One printed table row over the clips of one face size."""
    offsets = np.concatenate([f["offsets"] for f in found])
    return (f"{size:g} | {short_side} | {detection} | {np.mean([f['detected'] for f in found]):.3f} "
            f"| {np.nanmax(offsets):.2f} / {np.nanmedian(offsets):.2f} | {np.nanmean([f['ms'] for f in found]):.1f} "
            f"| {np.nanmean([f['detail'] for f in found]):.1f}")


def main() -> None:
    from media import Portrait, scene, speech_wav, write_clip

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[20, 24, 28, 32], help="face widths, pixels")
    parser.add_argument("--short-sides", type=int, nargs="+", default=[480, 720], help="max_short_side values")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    print("face px | short side | detection | frames detected | crop offset max / median (face widths) "
          "| detect ms/frame | crop detail")
    with tempfile.TemporaryDirectory(prefix="hicmae-small-faces-") as folder:
        folder = Path(folder)
        speech = speech_wav(folder / "speech.wav", "Did you see who came in")
        clips = {}
        for size in args.sizes:
            for i, (x, y) in enumerate(PLACES):
                portrait = Portrait("astronaut", size, x, y, drift=0.02)
                path = write_clip(folder / f"face{size:g}_{i}.mp4", seconds=args.seconds, size=HD, speech=speech,
                                  frames=scene([portrait]))
                clips.setdefault(size, []).append((path, portrait))
        for short_side in args.short_sides:
            for detection in ("short_then_full_range", "short_range"):
                settings = PreprocessSettings(max_short_side=short_side, face_detection=detection)
                with FaceDetector.from_settings(settings) as detector:
                    for size, sized in clips.items():
                        found = [measure(path, portrait, settings, detector) for path, portrait in sized]
                        print(row(size, short_side, detection, found), flush=True)

if __name__ == "__main__":
    main()
