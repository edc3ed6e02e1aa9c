"""CREMA-D (Cao et al. 2014): 91 actors, 12 sentences, 6 intended emotions; 6-class, 5 actor-block folds.

Where to get it: https://github.com/CheyneyComputerScience/CREMA-D (Git LFS; Open Database License).

Expected layout::

    <root>/VideoFlash/<actor>_<sentence>_<emotion>_<level>.flv    e.g. 1001_DFA_ANG_XX.flv
    <root>/AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav      same stem, 16 kHz mono
    (the repository's other folders and files are allowed and ignored)

Assumptions (each checked against the reference's published folds, 7,437 clips):
- The clip id is the file stem; the label is the intended emotion in the name (not the crowd votes),
  indices in the reference's order ANG, DIS, FEA, HAP, NEU, SAD.
- Faces come from the ``VideoFlash`` video, audio from the ``AudioWAV`` file of the same stem (as the
  reference: its audio is the clean 16 kHz recording).
- Folds: actors 1001-1091 in contiguous blocks of 18 (1001-1018 -> fold 1, ...), the last fold takes the
  remaining 19 actors (1073-1091).
- Five clips are left out, as the reference left them out: the four the dataset's README lists as broken
  (``1076_MTI_NEU_XX``, ``1076_MTI_SAD_XX``, ``1064_TIE_SAD_XX``, ``1064_IEO_DIS_MD``) and
  ``1040_ITH_SAD_XX``, whose audio file is distributed as ``1040_ITH_SAD_X.wav`` (so the reference found
  no audio for it). The full distribution has 7,442 videos; 7,442 - 5 = 7,437.
- Any other video without its audio file (or the reverse) is a layout error, not a silent drop.
"""

from __future__ import annotations

from pathlib import Path

from preprocessing.datasets._layout import LayoutChecker, block_fold, finish
from preprocessing.manifest import ClipRecord, DatasetInfo

NAME = "crema-d"
CLASSES = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
FIRST_ACTOR, ACTORS_PER_FOLD, NUM_FOLDS = 1001, 18, 5
CLIP_PATTERN = r"(?P<actor>1\d{3})_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_(?P<level>[A-Z]{1,2})"
EXCLUDED = {
    "1076_MTI_NEU_XX": "broken recording (dataset README)",
    "1076_MTI_SAD_XX": "broken recording (dataset README)",
    "1064_TIE_SAD_XX": "broken recording (dataset README)",
    "1064_IEO_DIS_MD": "broken recording (dataset README)",
    "1040_ITH_SAD_XX": "its audio is distributed as 1040_ITH_SAD_X.wav; the reference dropped it",
}
ALIASES = {"1040_ITH_SAD_X": "1040_ITH_SAD_XX"}


def canonical_ids(media: dict[str, str]) -> dict[str, str]:
    """Rename the one irregular file stem of the distribution to its clip id."""
    return {ALIASES.get(stem, stem): path for stem, path in media.items()}


def fold_of_actor(actor: int) -> int:
    """The reference's fold of an actor id: contiguous blocks of 18 actors, the last block 19."""
    return block_fold(actor - FIRST_ACTOR, ACTORS_PER_FOLD, NUM_FOLDS)


def build_manifest(root: Path) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Read ``root`` (see the module docstring) and return the dataset info and its clips."""
    check = LayoutChecker(NAME, root, __doc__)
    check.require("VideoFlash", "AudioWAV")
    videos = check.index_media("VideoFlash", CLIP_PATTERN, [".flv"])
    audios = check.index_media("AudioWAV", CLIP_PATTERN, [".wav"])
    videos, audios = canonical_ids(videos), canonical_ids(audios)
    check.check_empty("no .flv videos found in VideoFlash", [] if videos else [check.root / "VideoFlash"])
    kept = sorted(set(videos) - set(EXCLUDED))
    check.check_empty("videos without their AudioWAV file", [videos[c] for c in kept if c not in audios])
    check.check_empty("audio files without their VideoFlash video",
                      [audios[c] for c in sorted(set(audios) - set(videos) - set(EXCLUDED))])
    unknown = [videos[c] for c in kept if c.split("_")[2] not in CLASSES]
    check.check_empty(f"file names with an emotion code outside {CLASSES}", unknown)
    clips = []
    for clip_id in kept:
        actor, _sentence, emotion, _level = clip_id.split("_")
        clips.append(ClipRecord(clip_id=clip_id, video=videos[clip_id], audio=audios[clip_id],
                                label=CLASSES.index(emotion), speaker=actor,
                                fold=fold_of_actor(int(actor))))
    info = DatasetInfo(name=NAME, task="classification", classes=CLASSES,
                       num_folds=NUM_FOLDS,
                       protocol="5-fold subject-independent: actors 1001-1091 in contiguous blocks of 18 "
                                "(the last fold 19), as the reference")
    return finish(info, clips)
