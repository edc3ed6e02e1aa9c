"""The manifest: one row per clip, the contract between dataset adapters and preprocessing.

A manifest is two files side by side:

    <name>.jsonl        one ``ClipRecord`` per line (Ray Data and pandas read it directly)
    <name>.info.json    one ``DatasetInfo``: task, class names, fold count, protocol

A manifest is a function of the dataset's content alone, not of where it is mounted: media paths are relative to
the dataset's root folder (which the caller knows: ``params.yaml`` names it), and ``hash_media`` adds each media
file's sha256. So the same dataset gives byte-identical manifests in any checkout, and a file whose content
changes changes the manifest (and with it every stage downstream), whatever its name and time stamps.

The fold column holds the paper protocol's test fold (1-based). The clean protocol's validation split is
derived from it by ``split_for_fold``: a deterministic, speaker-disjoint slice of the training folds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from preprocessing.fileio import atomic_write_text, sha256_file

Task = Literal["classification", "regression", "unlabelled"]


class ClipRecord(BaseModel):
    """One clip of a dataset, as an adapter found it on disk."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_id: str = Field(min_length=1)
    video: str = Field(min_length=1, description="media file with the face video, relative to the root")
    audio: str | None = Field(None, description="separate audio file; None = the audio stream of `video`")
    start: float | None = Field(None, ge=0, description="segment start in seconds inside a longer recording")
    end: float | None = Field(None, gt=0, description="segment end in seconds")
    label: int | None = Field(None, ge=0, description="class index into DatasetInfo.classes")
    targets: list[float] | None = Field(None, description="dimensional labels, DatasetInfo.targets order")
    speaker: str | None = Field(None, description="speaker/subject id; None when the dataset has none")
    fold: int | None = Field(None, ge=1, description="1-based test fold of the paper protocol")
    video_sha256: str | None = Field(None, description="sha256 of the video file (``hash_media``)")
    audio_sha256: str | None = Field(None, description="sha256 of the separate audio file, if any")
    face_region: tuple[float, float, float, float] | None = Field(
        None, description="where the speaker's face is: (x0, y0, x1, y1), fractions of the upright frame's "
        "width and height; only faces centred inside it are tracked. None: any face")

    @model_validator(mode="after")
    def _segment_is_ordered(self) -> ClipRecord:
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"clip {self.clip_id}: end {self.end} is not after start {self.start}")
        return self

    @model_validator(mode="after")
    def _region_is_a_box(self) -> ClipRecord:
        if self.face_region is not None:
            x0, y0, x1, y1 = self.face_region
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError(f"clip {self.clip_id}: face_region {list(self.face_region)} is not a box "
                                 "(x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        return self


class DatasetInfo(BaseModel):
    """What a manifest's rows mean."""

    model_config = ConfigDict(extra="forbid")

    name: str
    task: Task
    classes: list[str] = Field(default_factory=list, description="class names in label-index order")
    targets: list[str] = Field(default_factory=list, description="names of the dimensional targets")
    num_folds: int = Field(0, ge=0)
    protocol: str = Field("", description="one sentence: how the folds were formed")

    @model_validator(mode="after")
    def _task_fields_agree(self) -> DatasetInfo:
        if self.task == "classification" and len(self.classes) < 2:
            raise ValueError(f"dataset {self.name}: classification needs at least two class names")
        if self.task == "regression" and not self.targets:
            raise ValueError(f"dataset {self.name}: regression needs target names")
        return self


def info_path(manifest_path: str | os.PathLike) -> Path:
    path = Path(manifest_path)
    return path.with_name(path.name.removesuffix(".jsonl") + ".info.json")


def validate_clips(info: DatasetInfo, clips: Sequence[ClipRecord]) -> None:
    """Cross-row checks: unique ids, labels inside the class list, folds inside the fold count."""
    seen: set[str] = set()
    for clip in clips:
        if clip.clip_id in seen:
            raise ValueError(f"dataset {info.name}: clip id {clip.clip_id!r} appears twice")
        seen.add(clip.clip_id)
        if info.task == "classification":
            if clip.label is None or clip.label >= len(info.classes):
                raise ValueError(f"dataset {info.name}: clip {clip.clip_id} has label {clip.label}, "
                                 f"expected 0..{len(info.classes) - 1}")
        if info.task == "regression":
            if clip.targets is None or len(clip.targets) != len(info.targets):
                raise ValueError(f"dataset {info.name}: clip {clip.clip_id} has targets {clip.targets}, "
                                 f"expected {len(info.targets)} values")
        if info.num_folds and (clip.fold is None or clip.fold > info.num_folds):
            raise ValueError(f"dataset {info.name}: clip {clip.clip_id} has fold {clip.fold}, "
                             f"expected 1..{info.num_folds}")


def write_manifest(path: str | os.PathLike, info: DatasetInfo, clips: Sequence[ClipRecord]) -> Path:
    """Validate and write ``path`` (.jsonl) and its info file atomically; returns the .jsonl path."""
    path = Path(path)
    validate_clips(info, clips)
    lines = [clip.model_dump_json(exclude_none=True) for clip in clips]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    atomic_write_text(info_path(path), info.model_dump_json(indent=2) + "\n")
    return path


def read_manifest(path: str | os.PathLike) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Read a manifest; a malformed line fails with the file and line number."""
    path = Path(path)
    try:
        info_text = info_path(path).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: its info file {info_path(path)} is missing") from err
    if "root" in json.loads(info_text):
        raise ValueError(f"{info_path(path)}: written by an older version of the pipeline (it records the dataset's "
                         "folder); run `hicmae manifest` again")
    info = DatasetInfo.model_validate_json(info_text)
    clips = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                clips.append(ClipRecord.model_validate_json(line))
            except ValueError as err:
                raise ValueError(f"{path}:{number}: not a valid clip record: {err}") from err
    validate_clips(info, clips)
    return info, clips


def _stable_order(text: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}:{text}".encode()).digest()


def split_for_fold(
    clips: Iterable[ClipRecord], test_fold: int, val_fraction: float = 0.1, seed: int = 0
) -> dict[str, list[ClipRecord]]:
    """Train / val / test for one test fold under the clean protocol.

    Validation takes ``ceil(val_fraction * n)`` of the n speakers of the training folds (clips, when speakers
    are unknown), ordered by a seeded hash: stable across machines and runs, speaker-disjoint from
    training. ``val_fraction=0`` gives the reference protocol's train/test only.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    clips = list(clips)
    group_of = {clip.clip_id: clip.speaker if clip.speaker is not None else clip.clip_id for clip in clips}
    train_groups = sorted({group_of[c.clip_id] for c in clips if c.fold != test_fold},
                          key=lambda group: _stable_order(group, seed))
    n_val = math.ceil(val_fraction * len(train_groups)) if val_fraction > 0 else 0
    val_groups = set(train_groups[:n_val])
    split: dict[str, list[ClipRecord]] = {"train": [], "val": [], "test": []}
    for clip in clips:
        if clip.fold == test_fold:
            split["test"].append(clip)
        elif group_of[clip.clip_id] in val_groups:
            split["val"].append(clip)
        else:
            split["train"].append(clip)
    return split


def media_files(clip: ClipRecord) -> list[str]:
    """The media files of a clip, as the manifest names them (relative to the root, or absolute)."""
    return [clip.video] + ([clip.audio] if clip.audio else [])


def hash_media(clips: Sequence[ClipRecord], root: str | os.PathLike, cache: str | os.PathLike | None = None,
               progress=None, threads: int = 8) -> list[ClipRecord]:
    """The clips with ``video_sha256`` (and ``audio_sha256``) set from their files under ``root``.

    ``cache`` (a JSON file, not a pipeline output) remembers each file's hash with its size and modification
    time, so that hashing a dataset again on the same machine reads only files that changed. A file that cannot
    be read gets no hash; preprocessing then records it as unreadable. ``progress``: a progress bar class with
    tqdm's interface (``tqdm`` itself, say), shown for 100 files or more; None: none.
    """
    from concurrent.futures import ThreadPoolExecutor

    root = Path(root)
    known = _read_hash_cache(cache)
    names = sorted({name for clip in clips for name in media_files(clip)})

    def entry(name: str) -> list | None:
        path = root / name
        try:
            stat = path.stat()
            stamp = [stat.st_size, stat.st_mtime_ns]
            if known.get(name, [None])[:2] == stamp:
                return known[name]
            return [*stamp, sha256_file(path)]
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=threads) as pool:  # hashlib releases the GIL: reading is the bound
        hashed = pool.map(entry, names)
        if progress is not None and len(names) >= 100:
            hashed = progress(hashed, total=len(names), unit="file", desc="hash media")
        entries = dict(zip(names, hashed, strict=True))
    if cache is not None:
        atomic_write_text(cache, json.dumps({name: e for name, e in entries.items() if e is not None}) + "\n")
    sha = {name: e[2] if e else None for name, e in entries.items()}
    return [clip.model_copy(update={"video_sha256": sha[clip.video],
                                    "audio_sha256": sha[clip.audio] if clip.audio else None}) for clip in clips]


def _read_hash_cache(cache: str | os.PathLike | None) -> dict[str, list]:
    try:
        return json.loads(Path(cache).read_text(encoding="utf-8")) if cache else {}
    except (OSError, ValueError):
        return {}
