"""MAFW (Liu et al. 2022), single-label part: 11 classes, the dataset's official 5 folds.

Where to get it: https://mafw-database.github.io/MAFW/ (academic licence; request from a university
address).

Expected layout::

    <root>/data/clips/00001.mp4 ... 10045.mp4                             the clips, with their audio
    <root>/Train & Test Set/single/no_caption/set_1/train.txt
    <root>/Train & Test Set/single/no_caption/set_1/test.txt
    ... set_2 ... set_5
    (other folders of the distribution, e.g. data/frames/ and Labels/, are allowed and ignored)

Assumptions (checked against the reference's published folds, 9,156 clips):
- Each split file has one clip per line, ``<file name> <label>``, separated by whitespace, e.g.
  ``00025.mp4 anger``; the label is one of the 11 single-emotion names below (case-insensitive). These
  lines are the label source (as in the reference), so no spreadsheet reader is needed.
- The clip of ``set_k/test.txt`` is in test fold k; a clip listed in two test files, or with two
  different labels, is a layout error. ``train.txt`` files must exist but are not needed for the folds.
- Clips whose video has no audio stream are left out (the reference could not extract audio from 21
  clips: 10,045 clips, 9,177 single-label, 9,156 with audio). This is the one check that opens media
  files: each clip's container header is read once with PyAV.
- The faces come from the clip video (the reference used the dataset's own ``data/frames`` images of the
  same clips). Speakers are not annotated: ``speaker`` is left empty.
- Class order (the reference's): anger, disgust, fear, happiness, neutral, sadness, surprise, contempt,
  anxiety, helplessness, disappointment.
"""

from __future__ import annotations

from pathlib import Path

from preprocessing.datasets._layout import LayoutChecker, finish, folds_from_test_lists
from preprocessing.datasets._media import has_audio_stream
from preprocessing.manifest import ClipRecord, DatasetInfo

NAME = "mafw"
CLASSES = ["anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise", "contempt",
           "anxiety", "helplessness", "disappointment"]
NUM_FOLDS = 5
SPLIT_DIR = "Train & Test Set/single/no_caption"
CLIP_DIR = "data/clips"


def split_file(fold: int, part: str) -> str:
    """Root-relative path of one official split file."""
    return f"{SPLIT_DIR}/set_{fold}/{part}.txt"


def read_split_file(check: LayoutChecker, relative: str) -> list[tuple[str, str]]:
    """(clip id, label name) pairs of one split file; a malformed line fails."""
    pairs, malformed = [], []
    path = check.root / relative
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1].lower() not in CLASSES:
            malformed.append(f"{path}:{number}: {line.strip()!r}")
            continue
        pairs.append((Path(fields[0]).stem, fields[1].lower()))
    check.check_empty(f"split-file lines that are not '<clip>.mp4 <one of {CLASSES}>'", malformed)
    return pairs


def build_manifest(root: Path) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Read ``root`` (see the module docstring) and return the dataset info and its clips."""
    check = LayoutChecker(NAME, root, __doc__)
    check.require(CLIP_DIR, *(split_file(k, part) for k in range(1, NUM_FOLDS + 1)
                              for part in ("train", "test")))
    folds = folds_from_test_lists(check, {k: read_split_file(check, split_file(k, "test"))
                                          for k in range(1, NUM_FOLDS + 1)})
    videos = check.index_media(CLIP_DIR, r"\d{5}", [".mp4"])
    check.check_empty("clips in the split files without their video in data/clips",
                      [f"{CLIP_DIR}/{c}.mp4" for c in sorted(folds) if c not in videos])
    clips = [ClipRecord(clip_id=clip_id, video=videos[clip_id], label=CLASSES.index(label), fold=fold)
             for clip_id, (fold, label) in sorted(folds.items())
             if has_audio_stream(check.root / videos[clip_id])]
    info = DatasetInfo(name=NAME, task="classification", classes=CLASSES,
                       num_folds=NUM_FOLDS,
                       protocol="official single-label 5 folds (Train & Test Set/single/no_caption/set_k); "
                                "clips without an audio stream left out")
    return finish(info, clips)
