"""Werewolf-XL (Zhang et al. 2021): speaker clips from 30 game sessions; 3-dim regression, 5 folds.

Where to get it: https://github.com/Xinda-Wu/Werewolf-XL-Baseline (links to the speaker videos and the
label files; academic licence).

Expected layout::

    <root>/<labels>.csv                     the dimensional (PAD) label file, one row per clip
    <root>/.../01_01_128.mp4                one speaker clip per row (any sub-folder; found by name)

Assumptions (checked against the reference's published folds, 14,457 clips):
- The label file is a CSV directly in the root whose header has the columns ``VideoName``, ``Pleasure``,
  ``Arousal`` and ``Dominance`` (case-insensitive; other columns, e.g. ``Session`` or categorical labels,
  are ignored). ``VideoName`` is the clip id ``<session>_<player>_<segment>`` with or without ``.mp4``.
  Exactly one such CSV must be present.
- Targets in the reference's column order: pleasure (= valence), arousal, dominance, as the file's
  floats (no rescaling).
- The first id field is the game session 01-30; folds are blocks of 6 sessions (01-06 -> fold 1, ...).
  The speaker is ``<session>_<player>`` (players are numbered per session).
- Every labelled clip needs its video (audio = the video's audio stream), else it is a layout error.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from preprocessing.datasets._layout import LayoutChecker, block_fold, finish
from preprocessing.manifest import ClipRecord, DatasetInfo

NAME = "werewolf-xl"
LABEL_COLUMNS = ["Pleasure", "Arousal", "Dominance"]
TARGETS = ["valence", "arousal", "dominance"]
SESSIONS_PER_FOLD, NUM_FOLDS = 6, 5
CLIP_PATTERN = r"\d{2}_\d{2}_\d+"


def find_label_file(check: LayoutChecker) -> Path:
    """The one CSV in the root whose header names the clip and the three PAD columns."""
    wanted = {name.lower() for name in ["VideoName", *LABEL_COLUMNS]}
    candidates = []
    for path in sorted(check.root.glob("*.csv")):
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = {name.strip().lower() for name in next(csv.reader(handle), [])}
        if wanted <= header:
            candidates.append(path)
    if len(candidates) != 1:
        problem = ("more than one CSV in the root has the label columns" if candidates else
                   "no CSV in the root has the columns VideoName, Pleasure, Arousal, Dominance")
        raise check.fail(problem, candidates or sorted(check.root.glob("*.csv")) or [check.root])
    return candidates[0]


def read_targets(check: LayoutChecker, label_file: Path) -> dict[str, list[float]]:
    """clip id -> [pleasure, arousal, dominance]; a bad id or value fails."""
    targets, malformed = {}, []
    for row in check.read_csv(label_file.name, ["VideoName", *LABEL_COLUMNS]):
        clip_id = Path(row["VideoName"]).stem if row["VideoName"].endswith(".mp4") else row["VideoName"]
        try:
            values = [float(row[name]) for name in LABEL_COLUMNS]
        except ValueError:
            values = []
        if not (values and all(math.isfinite(v) for v in values)) or not _is_clip_id(clip_id):
            malformed.append(f"{label_file.name}: {row}")
            continue
        targets[clip_id] = values
    check.check_empty("label rows with a malformed clip id or non-numeric values", malformed)
    return targets


def _is_clip_id(text: str) -> bool:
    parts = text.split("_")
    return len(parts) == 3 and all(p.isdigit() for p in parts) and 1 <= int(parts[0]) <= 30


def build_manifest(root: Path) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Read ``root`` (see the module docstring) and return the dataset info and its clips."""
    check = LayoutChecker(NAME, root, __doc__)
    check.require()
    targets = read_targets(check, find_label_file(check))
    videos = check.index_media(".", CLIP_PATTERN, [".mp4"])
    check.check_empty("labelled clips without their .mp4 video",
                      [c for c in sorted(targets) if c not in videos])
    clips = []
    for clip_id, values in targets.items():
        session, player, _segment = clip_id.split("_")
        clips.append(ClipRecord(clip_id=clip_id, video=videos[clip_id], targets=values,
                                speaker=f"{session}_{player}",
                                fold=block_fold(int(session) - 1, SESSIONS_PER_FOLD, NUM_FOLDS)))
    info = DatasetInfo(name=NAME, task="regression", targets=TARGETS,
                       num_folds=NUM_FOLDS,
                       protocol="5 folds by game session (first clip-id field): 01-06, 07-12, ..., 25-30")
    return finish(info, clips)
