"""Work units: fixed groups of clips, each written as one shard, atomically; the basis of resuming.

The clips are put in a pseudo-random order seeded by ``shard_seed`` (a hash of each clip id), independent of the
manifest's order, and unit i holds clips [i * shard_size, (i + 1) * shard_size) of that order: every shard is a
random sample of the dataset, whatever the order its files sort in (RAVDESS's names sort by emotion,
VoxCeleb2's by speaker). A unit's digest hashes its clip records (with their media files' sha256, from the
manifest), the dataset info and the output settings. A unit is done when ``units/unit-<i>.json`` exists with the
same digest and, if any clip succeeded, its shard and index exist and the shard has the size and sha256 the
status records (a truncated or overwritten shard is redone). The shard and its index are renamed into place
before the status file is written, so a run killed at any point leaves either a finished unit or one that the
next run redoes from scratch: no half-written shard, no duplicate clip.

Everything a unit writes is a function of its clips' content and the settings: no time stamps, durations,
process ids or absolute paths (the seconds each stage took are returned to the caller, ``UnitResult``), so the
same dataset preprocessed again, on any machine and from any folder, gives byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from preprocessing.clip import STAGES, process_clip, timed
from preprocessing.decode import MediaError
from preprocessing.face_detect import FaceDetector
from preprocessing.fileio import TEMP_GLOB, write_json
from preprocessing.manifest import ClipRecord, DatasetInfo
from preprocessing.settings import PreprocessSettings
from preprocessing.shard_index import (
    SHARDS_DIR,
    DamagedShard,
    ShardIndex,
    check_shard,
    index_file,
    read_index,
    shard_file,
    write_shard,
)
from preprocessing.shards import META_FIELD, sample_key


@dataclass
class WorkUnit:
    index: int
    digest: str
    clips: list[ClipRecord]

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "digest": self.digest,
                           "clips": [clip.model_dump() for clip in self.clips]})

    @classmethod
    def from_json(cls, text: str) -> WorkUnit:
        data = json.loads(text)
        return cls(data["index"], data["digest"], [ClipRecord(**clip) for clip in data["clips"]])


@dataclass
class UnitResult:
    """What processing a unit gave: its status (as written) and the seconds each stage took (not written)."""

    status: dict
    seconds: dict[str, float]


def status_path(out_dir: Path, index: int) -> Path:
    return out_dir / "units" / f"unit-{index:06d}.json"


def shard_order(clips: list[ClipRecord], seed: int) -> list[ClipRecord]:
    """The clips in a pseudo-random order that depends only on their ids and ``seed``."""
    return sorted(clips, key=lambda clip: hashlib.sha256(f"{seed}:{clip.clip_id}".encode()).digest())


def plan_units(info: DatasetInfo, clips: list[ClipRecord], settings: PreprocessSettings) -> list[WorkUnit]:
    """Group the clips, in ``shard_order``, into units of ``settings.shard_size`` and fingerprint each (records,
    media hashes, dataset info and output settings: what the unit's output is a function of)."""
    clips = shard_order(clips, settings.shard_seed)
    common = json.dumps([info.model_dump(), settings.output_fingerprint()], sort_keys=True)
    units = []
    for index, first in enumerate(range(0, len(clips), settings.shard_size)):
        group = clips[first:first + settings.shard_size]
        records = json.dumps([clip.model_dump() for clip in group], sort_keys=True)
        units.append(WorkUnit(index, hashlib.sha256((common + records).encode()).hexdigest(), group))
    return units


def read_status(out_dir: Path, index: int) -> dict | None:
    try:
        return json.loads(status_path(out_dir, index).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def unit_done(out_dir: Path, unit: WorkUnit) -> bool:
    """Whether the unit's status matches its digest and its shard (if any) is whole: present, with the recorded
    size and sha256, and indexed."""
    status = read_status(out_dir, unit.index)
    if status is None or status.get("digest") != unit.digest:
        return False
    if status["shard"] is None:
        return True
    recorded = ShardIndex(str(out_dir / status["shard"]), status.get("shard_size", -1), status.get("shard_sha256"), [])
    try:
        check_shard(recorded)
        return read_index(recorded.path).sha256 == recorded.sha256
    except DamagedShard:
        return False


def remove_leftovers(out_dir: Path, units: list[WorkUnit]) -> None:
    """Delete temp files of killed runs and shards/status files of units the plan no longer has."""
    for folder, pattern in ((SHARDS_DIR, "shard-*.tar"), (SHARDS_DIR, "shard-*.index.json"), ("units", "unit-*.json")):
        for path in (out_dir / folder).glob(TEMP_GLOB):
            path.unlink(missing_ok=True)
        for path in (out_dir / folder).glob(pattern):
            index = int(path.stem.split("-")[1].split(".")[0])
            if index >= len(units):
                path.unlink(missing_ok=True)


def _failure_row(root: Path, clip: ClipRecord, reason: str, file: str, detail: str) -> dict:
    """A status row for a failed clip; ``file``, and any mention of it in ``detail``, relative to the dataset root
    when it lies inside."""
    path = Path(file)
    if path.is_relative_to(root):
        relative = str(path.relative_to(root))
        detail = detail.replace(str(path), relative)
        file = relative
    return {"clip_id": clip.clip_id, "status": reason, "file": file, "detail": detail.replace(f"{root}/", "")}


def _face_row(sample: dict) -> dict:
    """The part of a clip's face detection that summary.json aggregates (from its encoded meta.json)."""
    meta = json.loads(sample[META_FIELD])
    face = meta["face"]
    return {"frames": meta["num_frames"], "detected": face["detected"], "detector_frames": face["detector_frames"],
            "side_px": face["side_px"]["median"]}


def process_unit(out_dir: Path, root: Path, info: DatasetInfo, unit: WorkUnit, settings: PreprocessSettings,
                 detector: FaceDetector) -> UnitResult:
    """Process every clip of a unit (media under the dataset folder ``root``), write its shard and then its status
    file.

    One clip's failure is recorded in its status row and never stops the others.
    """
    timings = {stage: 0.0 for stage in STAGES}
    samples, rows = [], []
    for clip in unit.clips:
        key = sample_key(clip.clip_id)
        try:
            samples.append(process_clip(root, info, clip, key, settings, detector, timings))
            rows.append({"clip_id": clip.clip_id, "status": "ok", "file": clip.video, "detail": "", "key": key,
                         "face": _face_row(samples[-1])})
        except MediaError as err:
            rows.append(_failure_row(root, clip, err.reason, err.path, err.detail))
        except Exception as err:  # noqa: BLE001 - an unexpected bug in one clip must not stop the unit
            rows.append(_failure_row(root, clip, "error", str(root / clip.video), f"{type(err).__name__}: {err}"))
    shard = shard_file(out_dir, unit.index)
    with timed(timings, "write"):
        if samples:
            written = write_shard(shard, samples)
        else:
            shard.unlink(missing_ok=True)
            index_file(shard).unlink(missing_ok=True)
    relative = str(shard.relative_to(out_dir)) if samples else None
    for row in rows:
        row["shard"] = relative if row["status"] == "ok" else None
    status = {"index": unit.index, "digest": unit.digest, "shard": relative,
              "shard_size": written.size if samples else None, "shard_sha256": written.sha256 if samples else None,
              "clips": rows}
    write_json(status_path(out_dir, unit.index), status)
    return UnitResult(status, timings)
