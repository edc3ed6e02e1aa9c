"""The report's look at the face crops: each dataset's face statistics (``summary.json``'s ``face``) as a table, and
a contact sheet of crops from clips drawn at random (seeded), read by index from the shards."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from preprocessing.shard_index import STATUS_FILE, SUMMARY_FILE, map_shard, read_index, sample_views
from preprocessing.shards import decode_sample

from .console import current
from .layout import shown
from .plots import contact_sheet_figure, save_figure

FACE_SHEET_CLIPS, FACE_SHEET_FRAMES = 8, 6  # a contact sheet: clips drawn at random, frames evenly spread in each
FACE_SHEET_SEED, FACE_SHEET_CROP = 0, 96    # the draw's seed; crop side on the sheet (pixels)


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def face_markdown(faces: dict[str, dict]) -> list[str]:
    """The face statistics of each dataset's preprocessing (``summary.json``'s ``face``) as a table."""
    lines = ["## Face detection", "",
             "| dataset | clips | frames | detected | filled in | short range | full range, tiles "
             "| face side px, median | 5th percentile |", "|---|---|---|---|---|---|---|---|---|"]
    for dataset, face in faces.items():
        side = face["side_px"]
        lines.append(f"| {dataset} | {face['clips']} | {face['frames']} | {_share(face['detected'])} "
                     f"| {_share(face['filled'])} | {_share(face['detectors'].get('short_range'))} "
                     f"| {_share(face['detectors'].get('full_range_tiles'))} | {side['median']} | {side['p5']} |")
    return lines + ["", "Per good clip: frames whose main face was detected (by which detector, as a share of the "
                    "detected frames) or filled in from its neighbours; face side: the main face's box side in the "
                    "decoded frames (median over each clip's frames), median and 5th percentile over the clips. "
                    "Each dataset's contact sheet (`faces.png`) shows crops of clips drawn at random.", ""]


def read_face_summary(processed: Path) -> dict | None:
    """``summary.json``'s face statistics of a preprocessed dataset; None when it was not preprocessed here."""
    path = processed / SUMMARY_FILE
    if not path.is_file():
        current().show(f"report: {shown(path)} not found: no face statistics or contact sheet")
        return None
    return json.loads(path.read_text()).get("face")


def _sheet_label(meta: dict) -> str:
    """A sheet row's label: the clip id and which detector found its face in how many of its frames."""
    face, frames = meta["face"], meta["num_frames"]
    found = [f"{name.replace('_', ' ')} {count / frames:.0%}" for name, count in face["detector_frames"].items()
             if count]
    filled = 1 - face["detected"] / frames
    return "\n".join([meta["clip_id"], ", ".join(found + ([f"filled {filled:.0%}"] if filled else []))])


def _strip(clip) -> np.ndarray:
    """``FACE_SHEET_FRAMES`` crops evenly spread over the clip, shrunk for the sheet: (k, side, side, 3)."""
    shown = np.linspace(0, len(clip.frames) - 1, FACE_SHEET_FRAMES).round().astype(int)
    return np.stack([cv2.resize(crop, (FACE_SHEET_CROP, FACE_SHEET_CROP), interpolation=cv2.INTER_AREA)
                     for crop in clip.frames[shown]])


def face_sheet(dataset: str, processed: Path, out: Path, seed: int = FACE_SHEET_SEED) -> Path:
    """``plots/<dataset>/faces.png``: ``FACE_SHEET_FRAMES`` crops of each of ``FACE_SHEET_CLIPS`` good clips drawn
    at random (``seed``) from the status table; each read by index from its shard, only the shown frames decoded."""
    rows = [json.loads(line) for line in (processed / STATUS_FILE).read_text().splitlines() if line.strip()]
    good = [row for row in rows if row["status"] == "ok"]
    drawn = sorted(np.random.default_rng(seed).choice(len(good), min(FACE_SHEET_CLIPS, len(good)), replace=False))
    strips, labels = [], []
    for row in (good[i] for i in drawn):  # in status order, so the sheet reads like the status table
        index = read_index(processed / row["shard"])
        [sample] = [sample for sample in index.samples if sample["key"] == row["key"]]
        clip = decode_sample(sample_views(map_shard(index.path), sample, index.path), lazy=True)
        strips.append(_strip(clip))
        labels.append(_sheet_label(clip.meta))
    figure = contact_sheet_figure(strips, labels, title=f"{dataset}: face crops of {len(strips)} clips drawn at "
                                                        f"random (seed {seed}) of {len(good)}")
    return save_figure(figure, out / "plots" / dataset / "faces.png")
