"""DFEW (Jiang et al. 2020): 16,372 in-the-wild movie clips; 7-class single-label, official 5 folds.

Where to get it: https://dfew-dataset.github.io/ (academic licence).

Expected layout::

    <root>/Clip/original/<n>.mp4                                    the clips (any sub-folder, e.g. part_1/)
    <root>/EmoLabel_DataSplit/train(single-labeled)/set_1.csv ... set_5.csv
    <root>/EmoLabel_DataSplit/test(single-labeled)/set_1.csv ... set_5.csv

Assumptions (the reference shipped no DFEW split files; this is the dataset's official protocol):
- Split files are CSVs with the header ``video_name,label``; ``video_name`` is the clip number (with or
  without zero padding), ``label`` is 1..7 = happy, sad, neutral, angry, surprise, disgust, fear
  (label index = label - 1, the order used by the DFEW baselines and MAE-DFER/HiCMAE).
- A clip of ``test(single-labeled)/set_k.csv`` is in test fold k; a clip in two test files is an error.
  ``train(single-labeled)`` files must exist but are not needed for the folds.
- The clip id is the 5-digit zero-padded number; the media file's stem is matched by its number, so
  ``1.mp4`` and ``00001.mp4`` both work. Faces and audio come from the original clip (the reference used
  the dataset's face frames ``clip_224x224``; clips without usable audio are reported by preprocessing).
- Speakers are not annotated: ``speaker`` is left empty.
"""

from __future__ import annotations

from pathlib import Path

from preprocessing.datasets._layout import LayoutChecker, finish, folds_from_test_lists
from preprocessing.manifest import ClipRecord, DatasetInfo

NAME = "dfew"
CLASSES = ["happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"]
NUM_FOLDS = 5
SPLIT_DIR = "EmoLabel_DataSplit"
CLIP_DIR = "Clip/original"


def split_file(part: str, fold: int) -> str:
    """Root-relative path of one official split file (``part`` is train or test)."""
    return f"{SPLIT_DIR}/{part}(single-labeled)/set_{fold}.csv"


def read_split(check: LayoutChecker, relative: str) -> list[tuple[str, str]]:
    """(clip id, class name) pairs of one split CSV; a bad number or label fails."""
    pairs, malformed = [], []
    for row in check.read_csv(relative, ["video_name", "label"]):
        number, label = Path(row["video_name"]).stem, row["label"]
        if not number.isdigit() or label not in {str(i) for i in range(1, len(CLASSES) + 1)}:
            malformed.append(f"{relative}: {row}")
            continue
        pairs.append((f"{int(number):05d}", CLASSES[int(label) - 1]))
    check.check_empty("split rows that are not '<clip number>,<label 1-7>'", malformed)
    return pairs


def build_manifest(root: Path) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Read ``root`` (see the module docstring) and return the dataset info and its clips."""
    check = LayoutChecker(NAME, root, __doc__)
    check.require(CLIP_DIR, *(split_file(part, k) for k in range(1, NUM_FOLDS + 1)
                              for part in ("train", "test")))
    folds = folds_from_test_lists(check, {k: read_split(check, split_file("test", k))
                                          for k in range(1, NUM_FOLDS + 1)})
    videos = {f"{int(stem):05d}": path
              for stem, path in check.index_media(CLIP_DIR, r"\d+", [".mp4", ".avi"]).items()}
    check.check_empty("clips in the split files without their video under Clip/original",
                      [clip for clip in sorted(folds) if clip not in videos])
    clips = [ClipRecord(clip_id=clip_id, video=videos[clip_id], label=CLASSES.index(label), fold=fold)
             for clip_id, (fold, label) in folds.items()]
    info = DatasetInfo(name=NAME, task="classification", classes=CLASSES,
                       num_folds=NUM_FOLDS, protocol="official single-label 5 folds (EmoLabel_DataSplit)")
    return finish(info, clips)
