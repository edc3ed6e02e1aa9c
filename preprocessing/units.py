"""Work units: fixed groups of clips, each written as one shard, atomically; the basis of resuming.

Unit i holds manifest clips [i * shard_size, (i + 1) * shard_size). Its digest hashes the clip records, the
size and modification time of their media files, the dataset info and the output settings. A unit is done
when ``units/unit-<i>.json`` exists with the same digest (and its shard, if any clip succeeded). The shard
is renamed into place before that status file is written, so a run killed at any point leaves either a
finished unit or one that the next run redoes from scratch: no half-written shard, no duplicate clip.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from preprocessing.clip import STAGES, process_clip, timed
from preprocessing.decode import MediaError
from preprocessing.face_detect import FaceDetector
from preprocessing.manifest import ClipRecord, DatasetInfo, write_json
from preprocessing.settings import PreprocessSettings
from preprocessing.shards import META_FIELD, sample_key, write_shard


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


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / "shards" / f"shard-{index:06d}.tar"


def status_path(out_dir: Path, index: int) -> Path:
    return out_dir / "units" / f"unit-{index:06d}.json"


def _file_stamp(path: Path) -> list:
    try:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    except OSError:
        return ["missing"]


def plan_units(info: DatasetInfo, clips: list[ClipRecord], settings: PreprocessSettings) -> list[WorkUnit]:
    """Group clips into units of ``settings.shard_size`` and fingerprint each."""
    root = Path(info.root)
    common = json.dumps([info.model_dump(), settings.output_fingerprint()], sort_keys=True)
    units = []
    for index, first in enumerate(range(0, len(clips), settings.shard_size)):
        group = clips[first:first + settings.shard_size]
        stamps = [[clip.model_dump(), _file_stamp(root / clip.video),
                   _file_stamp(root / clip.audio) if clip.audio else None] for clip in group]
        digest = hashlib.sha256((common + json.dumps(stamps, sort_keys=True)).encode()).hexdigest()
        units.append(WorkUnit(index, digest, group))
    return units


def read_status(out_dir: Path, index: int) -> dict | None:
    try:
        return json.loads(status_path(out_dir, index).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def unit_done(out_dir: Path, unit: WorkUnit) -> bool:
    status = read_status(out_dir, unit.index)
    if status is None or status.get("digest") != unit.digest:
        return False
    return status["shard"] is None or (out_dir / status["shard"]).exists()


def remove_leftovers(out_dir: Path, units: list[WorkUnit]) -> None:
    """Delete temp files of killed runs and shards/status files of units the plan no longer has."""
    for folder, pattern in (("shards", "shard-*.tar"), ("units", "unit-*.json")):
        for path in (out_dir / folder).glob(".*.tmp-*"):
            path.unlink(missing_ok=True)
        for path in (out_dir / folder).glob(pattern):
            index = int(path.stem.split("-")[1].split(".")[0])
            if index >= len(units):
                path.unlink(missing_ok=True)


def _failure_row(info: DatasetInfo, clip: ClipRecord, reason: str, file: str, detail: str) -> dict:
    """A status row for a failed clip; ``file`` relative to the dataset root when it lies inside."""
    path = Path(file)
    if path.is_relative_to(info.root):
        file = str(path.relative_to(info.root))
    return {"clip_id": clip.clip_id, "status": reason, "file": file, "detail": detail}


def _face_row(sample: dict) -> dict:
    """The part of a clip's face detection that summary.json aggregates (from its encoded meta.json)."""
    meta = json.loads(sample[META_FIELD])
    face = meta["face"]
    return {"frames": meta["num_frames"], "detected": face["detected"], "detector_frames": face["detector_frames"],
            "side_px": face["side_px"]["median"]}


def process_unit(out_dir: Path, info: DatasetInfo, unit: WorkUnit, settings: PreprocessSettings,
                 detector: FaceDetector) -> dict:
    """Process every clip of a unit, write its shard and then its status file; returns the status.

    One clip's failure is recorded in its status row and never stops the others.
    """
    timings = {stage: 0.0 for stage in STAGES}
    samples, rows = [], []
    for clip in unit.clips:
        key = sample_key(clip.clip_id)
        try:
            samples.append(process_clip(info, clip, key, settings, detector, timings))
            rows.append({"clip_id": clip.clip_id, "status": "ok", "file": clip.video, "detail": "", "key": key,
                         "face": _face_row(samples[-1])})
        except MediaError as err:
            rows.append(_failure_row(info, clip, err.reason, err.path, err.detail))
        except Exception as err:  # noqa: BLE001 - an unexpected bug in one clip must not stop the unit
            rows.append(_failure_row(info, clip, "error", clip.video, f"{type(err).__name__}: {err}"))
    shard = shard_path(out_dir, unit.index)
    with timed(timings, "write"):
        if samples:
            write_shard(shard, samples)
        else:
            shard.unlink(missing_ok=True)
    relative = str(shard.relative_to(out_dir)) if samples else None
    for row in rows:
        row["shard"] = relative if row["status"] == "ok" else None
    status = {"index": unit.index, "digest": unit.digest, "shard": relative, "clips": rows,
              "seconds": {stage: round(value, 4) for stage, value in timings.items()}, "pid": os.getpid()}
    write_json(status_path(out_dir, unit.index), status)
    return status
