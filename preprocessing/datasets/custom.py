"""Your own videos as a dataset: a clip list (CSV with a header row, or JSONL) with named columns.

``params.yaml`` lists the dataset (``datasets: {mine: {root: /data/mine}}``) and ``conf/datasets/mine.yaml``
names this adapter and its options:

    adapter: custom
    list: list.csv                   # the clip list, relative to the root (default list.csv)
    classes: [neutral, happy, sad]   # optional: the label order (default: the list's labels, sorted)
    # targets: [valence, arousal]    # instead of classes: a regression dataset, one list column per target
    # folds: 5                       # folds to make when the list has no fold column (default 5)

Expected layout::

    <root>/<list>    a .csv (header row) or .jsonl clip list, one row per clip, named columns:
                     path      the media file: absolute, or relative to the list file's folder
                     label     classification: the class name (not read for a regression dataset)
                     <target>  regression: one number per target named in ``targets``
                     speaker   optional: who speaks (folds are then speaker-disjoint)
                     fold      optional: the test fold (1, 2, ...), used as it is
                     start/end optional: seconds, a segment of a longer file
    the media files anywhere the paths name; any container and codec PyAV reads, with a face and sound

Assumptions:
- The list is checked as a whole before anything is written: a missing file, an unknown label, a clip listed
  twice (the same file and segment), a missing column or an empty list fail with one line per problem,
  ``<list>:<line>: <problem>``. A file that exists but cannot be decoded, or has no audio stream, is kept: it
  becomes a named status row in preprocessing, as in any dataset.
- Clip ids are the media paths relative to the root (absolute for files outside it), with ``@<start>-<end>``
  for a segment; media paths in the manifest are root-relative where the file lies inside the root (so the
  manifest does not depend on where the dataset is mounted), absolute otherwise.
- Folds: a ``fold`` column is used as it is (its folds numbered 1..k without gaps; ``folds: k``, when also
  given, bounds it). Without one, ``folds`` (default 5) folds are made: speaker-disjoint when the list has
  speakers, of single clips otherwise; speakers (or clips) in a seeded hash order of their names, each to the
  fold holding the fewest clips so far, so the same list always gives the same folds.
- Other columns are ignored. The audio is the media file's own audio stream.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

from preprocessing.datasets._layout import LayoutChecker, finish
from preprocessing.datasets.clip_list import (
    ClipList,
    ListedMedia,
    clip_name,
    first_of_each,
    listed_media,
    read_clip_list,
)
from preprocessing.manifest import ClipRecord, DatasetInfo

NAME = "custom"
LIST_FILE = "list.csv"
DEFAULT_FOLDS = 5
FOLD_SEED = 0


def class_labels(clips: ClipList, media: list[ListedMedia], classes: list[str] | None) -> tuple[list[str], list]:
    """(class names, each row's label index): ``classes`` in their order, else the sorted distinct labels."""
    if not clips.require("label"):
        return classes or [], [None] * len(media)
    names = list(classes) if classes else sorted({item.row.get("label") for item in media} - {""})
    labels = []
    for item in media:
        label = item.row.get("label")
        if not label:
            clips.problems.add(item.line, "empty label")
        elif label not in names:
            clips.problems.add(item.line, f"unknown label {label!r} (classes: {', '.join(names)})")
        labels.append(names.index(label) if label in names else None)
    if not classes and media and len(names) < 2:
        clips.problems.add(None, f"one label only ({', '.join(map(repr, names)) or 'none'}): classification needs "
                                 "at least two classes")
    return names, labels


def target_values(clips: ClipList, media: list[ListedMedia], targets: list[str]) -> list:
    """Each row's target values (``targets`` order) as floats; a missing or non-numeric value is a problem."""
    present = [name for name in targets if clips.require(name)]
    values = []
    for item in media:
        row = []
        for name in present:
            try:
                number = float(item.row.get(name))
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                clips.problems.add(item.line, f"{name} {item.row.get(name)!r} is not a number")
            row.append(number)
        values.append(row if len(present) == len(targets) else None)
    return values


def given_folds(clips: ClipList, media: list[ListedMedia], folds: int | None) -> tuple[list[int | None], int]:
    """The fold column's folds and their count (``folds``, or the highest fold); bad values are problems."""
    found = []
    for item in media:
        text = item.row.get("fold")
        fold = int(text) if text.isdigit() and int(text) >= 1 else None
        if fold is None:
            clips.problems.add(item.line, f"fold {text!r} is not a whole number >= 1")
        elif folds is not None and fold > folds:
            clips.problems.add(item.line, f"fold {fold} is above folds: {folds}")
        found.append(fold)
    count = folds or max((fold for fold in found if fold), default=0)
    gaps = sorted(set(range(1, count + 1)) - set(found))
    if gaps and media and None not in found:  # (a bad fold cell is reported already)
        clips.problems.add(None, f"no clip in fold(s) {', '.join(map(str, gaps))} of 1..{count}")
    return found, count


def assign_folds(group_sizes: dict[str, int], num_folds: int, seed: int = FOLD_SEED) -> dict[str, int]:
    """group -> 1-based fold: groups in a seeded hash order of their names, each to the fold that holds the fewest
    clips so far (the lowest fold on a tie): balanced, and the same for the same groups whatever the list's order."""
    order = sorted(group_sizes, key=lambda group: hashlib.sha256(f"{seed}:{group}".encode()).digest())
    sizes = [0] * num_folds
    folds = {}
    for group in order:
        fold = sizes.index(min(sizes))
        folds[group] = fold + 1
        sizes[fold] += group_sizes[group]
    return folds


def made_folds(clips: ClipList, media: list[ListedMedia], ids: list[str], num_folds: int) -> tuple[list[int], str]:
    """Folds made for a list without a fold column: speaker-disjoint when it has speakers, else of clips."""
    by_speaker = clips.has("speaker")
    groups = [item.row.get("speaker") if by_speaker else clip for item, clip in zip(media, ids, strict=True)]
    sizes: dict[str, int] = {}
    for group in groups:
        sizes[group] = sizes.get(group, 0) + 1
    kind = "speakers" if by_speaker else "clips"
    if media and len(sizes) < num_folds:
        fix = (f"set folds: {len(sizes)} or fewer in the dataset's conf file, or give a fold column"
               if len(sizes) >= 2 else "a dataset needs at least two")
        clips.problems.add(None, f"{len(sizes)} {kind[:-1] if len(sizes) == 1 else kind} cannot make {num_folds} "
                                 f"folds: {fix}")
        return [1] * len(media), ""
    folds = assign_folds(sizes, num_folds)
    disjoint = "speaker-disjoint folds" if by_speaker else "folds of single clips (no speaker column)"
    return [folds[group] for group in groups], (f"{num_folds} {disjoint}: {kind} in a seeded hash order, each to "
                                                "the fold with the fewest clips")


def manifest_path(path: Path, root: Path) -> str:
    """A media path for the manifest: relative to the root (forward slashes) when inside it, else absolute."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def build_manifest(root: Path, *, list_file: str = LIST_FILE, dataset: str = NAME, classes: list[str] | None = None,
                   targets: list[str] | None = None, folds: int | None = None) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Read the clip list ``root/list_file`` (see the module docstring) and return the dataset info and its clips."""
    check = LayoutChecker(dataset, root, __doc__)
    check.require(list_file)
    clips = read_clip_list(check.root / list_file)
    media = listed_media(clips)
    for item in media:
        if not item.path.is_file():
            clips.problems.add(item.line, f"no such file: {item.row.get('path')!r}")
    media, repeats = first_of_each(media)
    for repeat, first in sorted(repeats, key=lambda pair: pair[0].line):
        clips.problems.add(repeat.line, f"duplicate of line {first.line}: {repeat.row.get('path')!r}")
    media.sort(key=lambda item: item.line)
    base = Path(os.path.normpath(check.root.absolute()))
    ids = [clip_name(item, base) for item in media]
    if targets:
        task, names, labels, values = "regression", [], [None] * len(media), target_values(clips, media, targets)
    else:
        task, values = "classification", [None] * len(media)
        names, labels = class_labels(clips, media, classes)
    speakers = [item.row.get("speaker") or None for item in media] if clips.has("speaker") else [None] * len(media)
    for item, speaker in zip(media, speakers, strict=True):
        if clips.has("speaker") and speaker is None:
            clips.problems.add(item.line, "empty speaker (give every row a speaker, or none)")
    if clips.has("fold"):
        fold_of, num_folds = given_folds(clips, media, folds)
        protocol = f"{num_folds} folds as given in the list's fold column"
    else:
        num_folds = folds or DEFAULT_FOLDS
        fold_of, protocol = made_folds(clips, media, ids, num_folds)
    clips.problems.check()
    records = [ClipRecord(clip_id=clip_id, video=manifest_path(item.path, base), start=item.start, end=item.end,
                          label=label, targets=value, speaker=speaker, fold=fold)
               for item, clip_id, label, value, speaker, fold
               in zip(media, ids, labels, values, speakers, fold_of, strict=True)]
    info = DatasetInfo(name=dataset, task=task, classes=names,
                       targets=list(targets or []), num_folds=num_folds, protocol=protocol)
    return finish(info, records)
