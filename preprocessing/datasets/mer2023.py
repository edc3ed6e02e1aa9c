"""MER2023, MER-MULTI track (Lian et al. 2023): Chinese movie/TV clips; 6-class, official train / test.

Where to get it: http://merchallenge.cn/datasets (end-user licence agreement with the organisers).

Expected layout::

    <root>/mer2023train/train-label.csv          header name,discrete,valence (the training set)
    <root>/mer2023train/video/<name>.avi|mp4     the training clips
    <root>/mer2023test/test1-label.csv           the MER-MULTI test labels, same columns
    <root>/mer2023test/test1/<name>.avi|mp4      the MER-MULTI test clips

Assumptions (the reference shipped no MER2023 split files; this is the challenge's protocol):
- Both label files are CSVs with the columns ``name`` and ``discrete`` (``valence`` and others are
  ignored); ``discrete`` is one of neutral, angry, happy, sad, worried, surprise, the index order of the
  MER2023 baseline. The folder and label-file names of the test set are our assumption of how the
  released test labels are unpacked; rename to match.
- Folds: fold 1 = the MER-MULTI test set (the only test fold of the protocol), fold 2 = the training set.
  Only fold 1 is meant to be tested; with the clean protocol the validation split comes from fold 2.
- Speakers are not annotated: ``speaker`` is left empty. Audio is the clip's own audio stream.
- A labelled clip without its video, or a clip in both sets, is a layout error.
"""

from __future__ import annotations

from pathlib import Path

from preprocessing.datasets._layout import LayoutChecker, finish, folds_from_test_lists
from preprocessing.manifest import ClipRecord, DatasetInfo

NAME = "mer2023"
CLASSES = ["neutral", "angry", "happy", "sad", "worried", "surprise"]
PARTS = {1: ("mer2023test/test1-label.csv", "mer2023test/test1"),
         2: ("mer2023train/train-label.csv", "mer2023train/video")}


def read_labels(check: LayoutChecker, relative: str) -> list[tuple[str, str]]:
    """(clip name, class) pairs of one label file; an unknown class fails."""
    rows = check.read_csv(relative, ["name", "discrete"])
    check.check_empty(f"label rows with a class outside {CLASSES}",
                      [f"{relative}: {row}" for row in rows if row["discrete"].lower() not in CLASSES])
    return [(row["name"], row["discrete"].lower()) for row in rows]


def build_manifest(root: Path) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Read ``root`` (see the module docstring) and return the dataset info and its clips."""
    check = LayoutChecker(NAME, root, __doc__)
    check.require(*(path for part in PARTS.values() for path in part))
    folds = folds_from_test_lists(check, {fold: read_labels(check, labels)
                                          for fold, (labels, _) in PARTS.items()})
    videos = {fold: check.index_media(folder, r"[\w-]+", [".avi", ".mp4"])
              for fold, (_, folder) in PARTS.items()}
    check.check_empty("labelled clips without their video",
                      [f"{PARTS[fold][1]}/{name}" for name, (fold, _) in sorted(folds.items())
                       if name not in videos[fold]])
    clips = [ClipRecord(clip_id=name, video=videos[fold][name], label=CLASSES.index(label), fold=fold)
             for name, (fold, label) in folds.items()]
    info = DatasetInfo(name=NAME, task="classification", classes=CLASSES,
                       num_folds=len(PARTS),
                       protocol="official split: fold 1 = MER-MULTI test set (the one to test), "
                                "fold 2 = training set")
    return finish(info, clips)
