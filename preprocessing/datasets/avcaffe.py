"""AVCAffe (Sarkar et al. 2023): remote-work video calls of 106 participants; arousal and valence.

Where to get it: https://github.com/pritamqu/AVCAffe (request form; academic licence).

Expected layout::

    <root>/videos/<participant>/<task>/<clip>.mp4        short clips cut from each task recording
    <root>/labels.csv                                    header participant,task,arousal,valence
    <root>/splits/train.txt                              one participant id per line
    <root>/splits/test.txt                               one participant id per line

Assumptions (the reference shipped neither AVCAffe split files nor a label builder, and the dataset's
own file formats could not be verified; this layout is our documented stand-in for them):
- Labels are self-reports per (participant, task): every clip of a task inherits its task's arousal and
  valence scores, kept as floats in that order. The paper treats each dimension as a classification of
  the integer score (weighted F1), which is derived downstream by rounding these targets.
- Folds: fold 1 = the test participants (the only test fold), fold 2 = the training participants; a
  participant in both lists or in neither is a layout error. Speaker = participant.
- The clip id is ``<participant>/<task>/<clip>``; audio is the clip's own audio stream.
- A clip whose (participant, task) has no label row is a layout error.
"""

from __future__ import annotations

import math
from pathlib import Path

from preprocessing.datasets._layout import LayoutChecker, finish
from preprocessing.manifest import ClipRecord, DatasetInfo

NAME = "avcaffe"
TARGETS = ["arousal", "valence"]
SPLITS = {1: "splits/test.txt", 2: "splits/train.txt"}
VIDEO_DIR, LABEL_FILE = "videos", "labels.csv"


def read_task_labels(check: LayoutChecker) -> dict[tuple[str, str], list[float]]:
    """(participant, task) -> [arousal, valence]; a non-numeric score fails."""
    labels, malformed = {}, []
    for row in check.read_csv(LABEL_FILE, ["participant", "task", *TARGETS]):
        try:
            values = [float(row[name]) for name in TARGETS]
        except ValueError:
            values = [math.nan]
        if not all(math.isfinite(v) for v in values):
            malformed.append(f"{LABEL_FILE}: {row}")
        labels[(row["participant"], row["task"])] = values
    check.check_empty("label rows with non-numeric scores", malformed)
    return labels


def participant_folds(check: LayoutChecker) -> dict[str, int]:
    """participant -> fold from the split lists; a participant in both lists fails."""
    folds, twice = {}, []
    for fold, relative in SPLITS.items():
        for participant in (check.root / relative).read_text(encoding="utf-8").split():
            if participant in folds:
                twice.append(participant)
            folds[participant] = fold
    check.check_empty("participants in both split lists", twice)
    return folds


def build_manifest(root: Path) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Read ``root`` (see the module docstring) and return the dataset info and its clips."""
    check = LayoutChecker(NAME, root, __doc__)
    check.require(VIDEO_DIR, LABEL_FILE, *SPLITS.values())
    labels, folds = read_task_labels(check), participant_folds(check)
    videos = sorted((check.root / VIDEO_DIR).glob("*/*/*.mp4"))
    check.check_empty("no videos/<participant>/<task>/<clip>.mp4 files", [] if videos else [VIDEO_DIR])
    ids = [video.relative_to(check.root / VIDEO_DIR).with_suffix("").as_posix() for video in videos]
    check.check_empty("clips of participants in neither split list",
                      [i for i in ids if i.split("/")[0] not in folds])
    check.check_empty("clips whose participant and task have no label row",
                      [i for i in ids if tuple(i.split("/")[:2]) not in labels])
    clips = []
    for clip_id, video in zip(ids, videos, strict=True):
        participant, task, _clip = clip_id.split("/")
        clips.append(ClipRecord(clip_id=clip_id, video=check.rel(video), targets=labels[(participant, task)],
                                speaker=participant, fold=folds[participant]))
    info = DatasetInfo(name=NAME, task="regression", targets=TARGETS,
                       num_folds=len(SPLITS),
                       protocol="participant-independent split: fold 1 = test participants, fold 2 = train")
    return finish(info, clips)
