"""RAVDESS (Livingstone & Russo 2018), speech part: 24 actors x 60 utterances; 8-class, 6 actor folds.

Where to get it: https://zenodo.org/record/1188976 (CC BY-NC-SA 4.0): ``Video_Speech_Actor_01.zip`` ...
``Video_Speech_Actor_24.zip`` and ``Audio_Speech_Actors_01-24.zip``, all unpacked into the same root.

Expected layout::

    <root>/Actor_01/02-01-<em>-<int>-<stmt>-<rep>-01.mp4    video-only speech file (modality 02)
    <root>/Actor_01/03-01-<em>-<int>-<stmt>-<rep>-01.wav    audio-only speech file (modality 03)
    ... Actor_02 ... Actor_24 (the files may sit in any sub-folder of the root; they are found by name)

Assumptions (checked against the reference's published folds, 1,440 clips):
- File names follow the dataset's 7-field code ``modality-channel-emotion-intensity-statement-repetition-
  actor``. Only speech (channel 01) is used; song files and the audio-visual ``01-`` files are ignored.
- A clip is one utterance: faces from its video-only ``02-`` file, audio from the audio-only ``03-`` file
  with the same six remaining fields; the clip id is the ``02-`` file stem.
- Label = emotion code - 1: neutral, calm, happy, sad, angry, fearful, disgust, surprised.
- Folds: 6 blocks of 4 actors (01-04 -> fold 1, 05-08 -> fold 2, ..., 21-24 -> fold 6).
- Every video-only file needs its audio-only file and vice versa, otherwise it is a layout error.
"""

from __future__ import annotations

from pathlib import Path

from preprocessing.datasets._layout import LayoutChecker, block_fold, finish
from preprocessing.manifest import ClipRecord, DatasetInfo

NAME = "ravdess"
CLASSES = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
ACTORS_PER_FOLD, NUM_FOLDS = 4, 6
UTTERANCE = r"01-0[1-8]-0[12]-0[12]-0[12]-(?:0[1-9]|1\d|2[0-4])"


def utterance_key(stem: str) -> str:
    """The six fields after the modality code: what a video-only and an audio-only file share."""
    return stem.split("-", 1)[1]


def build_manifest(root: Path) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Read ``root`` (see the module docstring) and return the dataset info and its clips."""
    check = LayoutChecker(NAME, root, __doc__)
    check.require()
    videos = {utterance_key(s): p for s, p in check.index_media(".", "02-" + UTTERANCE, [".mp4"]).items()}
    audios = {utterance_key(s): p for s, p in check.index_media(".", "03-" + UTTERANCE, [".wav"]).items()}
    check.check_empty("no video-only speech files (02-01-*.mp4) found",
                      [] if videos else [check.root])
    check.check_empty("video-only files without their audio-only 03- file",
                      [videos[k] for k in sorted(set(videos) - set(audios))])
    check.check_empty("audio-only files without their video-only 02- file",
                      [audios[k] for k in sorted(set(audios) - set(videos))])
    clips = []
    for key, video in videos.items():
        _channel, emotion, _intensity, _statement, _repetition, actor = key.split("-")
        clips.append(ClipRecord(clip_id=f"02-{key}", video=video, audio=audios[key], label=int(emotion) - 1,
                                speaker=actor, fold=block_fold(int(actor) - 1, ACTORS_PER_FOLD, NUM_FOLDS)))
    info = DatasetInfo(name=NAME, task="classification", classes=CLASSES,
                       num_folds=NUM_FOLDS,
                       protocol="6-fold subject-independent: 4 actors per fold (01-04, 05-08, ..., 21-24)")
    return finish(info, clips)
