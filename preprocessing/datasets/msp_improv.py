"""MSP-IMPROV (Busso et al. 2017): 12 actors in 6 dyadic sessions; 4-class, leave-one-session-out.

Where to get it: https://ecs.utdallas.edu/research/researchlabs/msp-lab/MSP-Improv.html (academic licence
from the MSP lab).

Expected layout::

    <root>/Evaluation.txt                                        consensus labels (as distributed)
    <root>/.../MSP-IMPROV-S01A-F01-P-FM01.avi                    one video per utterance
    <root>/.../MSP-IMPROV-S01A-F01-P-FM01.wav                    the utterance's audio
    (the media may sit in any sub-folders, e.g. the distribution's session1/S01A/P/ or Video/, Audio/;
    they are found by name)

Assumptions (checked against the reference's published folds, 7,787 clips):
- ``Evaluation.txt`` holds, per utterance, a header line
  ``UTD-IMPROV-S01A-F01-P-FM01.avi; N; A:2.8; V:3.0; D:2.6 ; N:3.2;`` (the consensus emotion letter) followed
  by one line per rater; only the header lines are read. The clip id is the name with ``UTD-IMPROV-``
  replaced by ``MSP-IMPROV-`` and without the extension (the media files' stem).
- Classes A, H, N, S (angry, happy, neutral, sad) -> 0..3; utterances whose consensus is O (other) or
  X (no agreement) are left out. All recording types (P, R, S, T) are kept.
- The third field (``F01``) is the speaking actor; its number is the session. Fold k = session k
  (test = actors F0k and M0k), 6 folds.
- A labelled utterance of the four classes without its .avi or .wav is a layout error.
- No face region hint is set: we found no documented rule for where the speaking actor is in a dyadic
  session's videos (what we could read of the MSP lab's corpus page and of the paper's abstract does not say
  whether an utterance's video shows one actor or both, nor on which side), and no public preprocessing code
  that states one. Preprocessing therefore tracks the largest face; check the report's contact sheet, and add
  a hint here once the layout is known.
"""

from __future__ import annotations

import re
from pathlib import Path

from preprocessing.datasets._layout import LayoutChecker, finish
from preprocessing.manifest import ClipRecord, DatasetInfo

NAME = "msp-improv"
CODES = ["A", "H", "N", "S"]
CLASSES = ["angry", "happy", "neutral", "sad"]
NUM_FOLDS = 6
LABEL_FILE = "Evaluation.txt"
CLIP_PATTERN = r"MSP-IMPROV-S\d{2}[AHNS]-[FM]0[1-6]-[PRST]-[FM]{2}\d{2}"
HEADER_LINE = re.compile(r"^UTD-IMPROV-(?P<name>[A-Z0-9-]+)\.avi;\s*(?P<code>[A-Z]);")


def read_consensus_labels(path: Path) -> dict[str, str]:
    """clip id -> consensus emotion letter, from the utterance header lines of ``Evaluation.txt``."""
    labels = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = HEADER_LINE.match(line.strip())
        if match:
            labels[f"MSP-IMPROV-{match['name']}"] = match["code"]
    return labels


def build_manifest(root: Path) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Read ``root`` (see the module docstring) and return the dataset info and its clips."""
    check = LayoutChecker(NAME, root, __doc__)
    check.require(LABEL_FILE)
    labels = read_consensus_labels(check.root / LABEL_FILE)
    check.check_empty("no utterance header lines (UTD-IMPROV-<name>.avi; <code>; ...) in the label file",
                      [] if labels else [check.root / LABEL_FILE])
    videos = check.index_media(".", CLIP_PATTERN, [".avi"])
    audios = check.index_media(".", CLIP_PATTERN, [".wav"])
    used = sorted(clip for clip, code in labels.items() if code in CODES)
    check.check_empty("labelled utterances without their .avi video", [c for c in used if c not in videos])
    check.check_empty("labelled utterances without their .wav audio", [c for c in used if c not in audios])
    clips = []
    for clip_id in used:
        speaker = clip_id.split("-")[3]
        clips.append(ClipRecord(clip_id=clip_id, video=videos[clip_id], audio=audios[clip_id],
                                label=CODES.index(labels[clip_id]), speaker=speaker, fold=int(speaker[1:])))
    info = DatasetInfo(name=NAME, task="classification", classes=CLASSES,
                       num_folds=NUM_FOLDS,
                       protocol="6-fold leave-one-session-out: fold k tests actors F0k and M0k")
    return finish(info, clips)
