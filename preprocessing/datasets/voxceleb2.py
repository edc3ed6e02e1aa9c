"""VoxCeleb2 (Chung et al. 2018), dev set: unlabelled talking-face clips for pre-training.

Where to get it: https://www.robots.ox.ac.uk/~vgg/data/voxceleb/vox2.html (the mp4 and the optional aac
archives of the dev set).

Expected layout::

    <root>/dev/mp4/id00012/21Uxsk56VDQ/00001.mp4      speaker / YouTube video / clip
    <root>/dev/aac/id00012/21Uxsk56VDQ/00001.m4a      optional: the official audio of the same clip

Assumptions:
- The clip id is ``<speaker>/<video>/<clip>`` (clip numbers repeat across videos); speaker = ``idXXXXX``.
- Audio comes from the matching ``dev/aac`` file when it exists, else from the mp4's own audio stream.
- No labels and no folds (pre-training uses every clip); the test set (``test/``) is not read.
"""

from __future__ import annotations

from pathlib import Path

from preprocessing.datasets._layout import LayoutChecker, finish
from preprocessing.manifest import ClipRecord, DatasetInfo

NAME = "voxceleb2"
VIDEO_DIR, AUDIO_DIR = "dev/mp4", "dev/aac"


def build_manifest(root: Path) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Read ``root`` (see the module docstring) and return the dataset info and its clips."""
    check = LayoutChecker(NAME, root, __doc__)
    check.require(VIDEO_DIR)
    videos = sorted((check.root / VIDEO_DIR).glob("id*/*/*.mp4"))
    check.check_empty("no dev/mp4/idXXXXX/<video>/<clip>.mp4 files",
                      [] if videos else [check.root / VIDEO_DIR])
    clips = []
    for video in videos:
        clip_id = video.relative_to(check.root / VIDEO_DIR).with_suffix("").as_posix()
        audio = check.root / AUDIO_DIR / f"{clip_id}.m4a"
        clips.append(ClipRecord(clip_id=clip_id, video=check.rel(video),
                                audio=check.rel(audio) if audio.is_file() else None,
                                speaker=clip_id.split("/")[0]))
    info = DatasetInfo(name=NAME, task="unlabelled",
                       protocol="unlabelled pre-training set (dev split)")
    return finish(info, clips)
