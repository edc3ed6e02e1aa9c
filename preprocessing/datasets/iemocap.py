"""IEMOCAP (Busso et al. 2008): 5 dyadic sessions; 4-class (happy + excited), leave-one-session-out.

Where to get it: https://sail.usc.edu/iemocap/ (release form from USC SAIL), ``IEMOCAP_full_release``.

Expected layout::

    <root>/Session1/dialog/avi/DivX/Ses01F_impro01.avi           one video per dialogue (both actors)
    <root>/Session1/dialog/EmoEvaluation/Ses01F_impro01.txt      the dialogue's utterance labels
    ... Session2 ... Session5

Assumptions (the reference shipped no IEMOCAP split files; this is the common protocol):
- Each EmoEvaluation file has one summary line per utterance,
  ``[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]``: start and end seconds
  inside the dialogue recording, utterance id, consensus label, dimensional scores. Other lines
  (per-evaluator, comments) are ignored; so are files starting with ``._``.
- Classes angry (ang), happy (hap and exc merged), neutral (neu), sad (sad); every other label (fru,
  sur, fea, dis, oth, xxx) is left out (5,531 utterances in the full release).
- A clip is the utterance's time span [start, end] of the dialogue ``.avi`` (video and its audio); the
  ``sentences/wav`` cuts are not used.
- The speaking actor is the utterance id's last field's first letter (``F000`` -> female): speaker
  ``Ses01F``; fold k = session k (5 folds, speaker-disjoint).
- The dialogue video shows both actors side by side; each clip gets a face region hint, the half of the frame
  where its speaker sits. The release's README.txt documents which actor wore the motion-capture markers: the
  dialogue name's sixth character (``Ses01F_impro01``: the female actor). Which side of the frame that actor is
  on is documented by no source we found from the dataset's owners (README.txt, the 2008 paper's abstract and
  the website's summary say nothing of it). The rule used, the actor wearing markers on the left and the other
  on the right, is the convention of public IEMOCAP preprocessing code (IoannisKansizoglou/Iemocap-preprocess,
  ``extractionmapCreator.py``, ``find_speaker``: "Female speaker is on the left side" when the dialogue name
  says F, on the right otherwise); CMU's MultimodalSDK likewise ships IEMOCAP face features per side
  (``IEMOCAP_OpenFace_Leftside`` / ``_Rightside``). Check it on the report's contact sheet (the crops must show
  the speaker named by each clip id); ``MARKER_ACTOR_SIDE`` flips it.
- An utterance whose dialogue video is missing is a layout error.
"""

from __future__ import annotations

import re
from pathlib import Path

from preprocessing.datasets._layout import LayoutChecker, finish
from preprocessing.manifest import ClipRecord, DatasetInfo

NAME = "iemocap"
CLASSES = ["angry", "happy", "neutral", "sad"]
CODE_TO_CLASS = {"ang": "angry", "hap": "happy", "exc": "happy", "neu": "neutral", "sad": "sad"}
NUM_FOLDS = 5
MARKER_ACTOR_SIDE = "left"  # where the actor wearing markers (the dialogue name's sixth character) sits
HALVES = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0)}
SUMMARY_LINE = re.compile(r"^\[(?P<start>\d+(?:\.\d+)?) - (?P<end>\d+(?:\.\d+)?)\]\s+"
                          r"(?P<utterance>Ses0[1-5][FM]_\S+_(?P<speaker>[FM])\d+)\s+(?P<code>\w+)\s+\[")


def read_evaluation(path: Path) -> list[re.Match]:
    """The utterance summary lines of one EmoEvaluation file."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [match for line in lines if (match := SUMMARY_LINE.match(line.strip()))]


def speaker_region(dialogue: str, utterance: str) -> tuple[float, float, float, float]:
    """The half of the dialogue video where the utterance's speaker sits (see the module docstring)."""
    marker_actor, speaker = dialogue[5], utterance.rsplit("_", 1)[1][0]
    other = "right" if MARKER_ACTOR_SIDE == "left" else "left"
    return HALVES[MARKER_ACTOR_SIDE if speaker == marker_actor else other]


def build_manifest(root: Path) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Read ``root`` (see the module docstring) and return the dataset info and its clips."""
    check = LayoutChecker(NAME, root, __doc__)
    sessions = [f"Session{k}" for k in range(1, NUM_FOLDS + 1)]
    check.require(*(f"{s}/dialog/{part}" for s in sessions for part in ("avi/DivX", "EmoEvaluation")))
    clips, missing = [], []
    for fold, session in enumerate(sessions, start=1):
        for label_file in sorted((check.root / session / "dialog" / "EmoEvaluation").glob("Ses*.txt")):
            video = f"{session}/dialog/avi/DivX/{label_file.stem}.avi"
            utterances = [m for m in read_evaluation(label_file) if m["code"] in CODE_TO_CLASS]
            if utterances and not (check.root / video).is_file():
                missing.append(video)
                continue
            clips.extend(ClipRecord(clip_id=m["utterance"], video=video, start=float(m["start"]),
                                    end=float(m["end"]), label=CLASSES.index(CODE_TO_CLASS[m["code"]]),
                                    speaker=f"{m['utterance'][:5]}{m['speaker']}", fold=fold,
                                    face_region=speaker_region(label_file.stem, m["utterance"]))
                         for m in utterances)
    check.check_empty("dialogue videos missing for labelled utterances", missing)
    check.check_empty("no labelled utterances found in the EmoEvaluation files",
                      [] if clips else [check.root / "Session1/dialog/EmoEvaluation"])
    info = DatasetInfo(name=NAME, task="classification", classes=CLASSES,
                       num_folds=NUM_FOLDS,
                       protocol="5-fold leave-one-session-out; 4 classes, excited merged into happy")
    return finish(info, clips)
