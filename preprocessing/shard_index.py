"""Shard files on disk: each shard with an index of its samples' byte offsets, checked against its recorded size
and sha256, and read one sample at a time.

A preprocessed dataset folder holds ``shards/shard-XXXXXX.tar`` and beside each its index
``shard-XXXXXX.index.json``::

    {"shard": "shard-000000.tar", "size": <bytes>, "sha256": "<hex>",
     "samples": [{"key": "...", "clip_id": "...", "members": {"frames.jpgs": [offset, size], ...}}, ...]}

plus ``units/`` (preprocessing.units), ``status.jsonl`` (one row per manifest clip) and ``summary.json``.
A tar member's bytes lie at a fixed offset, so fine-tuning reads any clip through views of the mapped shard (random
access: only the clips of a fold's split are read), while pre-training streams whole shards sequentially.
"""

from __future__ import annotations

import json
import mmap
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from preprocessing.errors import InputError
from preprocessing.fileio import atomic_path, json_text, sha256_file
from preprocessing.shards import META_FIELD

SHARDS_DIR, STATUS_FILE, SUMMARY_FILE = "shards", "status.jsonl", "summary.json"
INDEX_SUFFIX = ".index.json"


class DamagedShard(InputError):
    """A shard that does not match its index (truncated, overwritten, missing): its data cannot be trusted."""


@dataclass(frozen=True)
class ShardIndex:
    """One shard: its path, recorded size and sha256, and per sample the byte range of every member."""

    path: str
    size: int
    sha256: str
    samples: list[dict]

    @property
    def clip_ids(self) -> list[str]:
        return [sample["clip_id"] for sample in self.samples]


def shard_file(processed_dir: str | os.PathLike, index: int) -> Path:
    return Path(processed_dir) / SHARDS_DIR / f"shard-{index:06d}.tar"


def index_file(shard: str | os.PathLike) -> Path:
    shard = Path(shard)
    return shard.with_name(shard.name.removesuffix(".tar") + INDEX_SUFFIX)


def list_shards(processed_dir: str | os.PathLike) -> list[str]:
    """The shards of a preprocessed dataset folder, sorted; an error naming the folder when there are none."""
    paths = sorted(str(p) for p in (Path(processed_dir) / SHARDS_DIR).glob("shard-*.tar"))
    if not paths:
        raise FileNotFoundError(f"{processed_dir}: no shards under {SHARDS_DIR}/ (has preprocessing run?)")
    return paths


def write_shard(path: str | os.PathLike, samples: Iterable[dict]) -> ShardIndex:
    """Write encoded samples (``shards.encode_sample``) to ``path`` and its index, both atomically.

    Both are written in full to temporary files before either replaces its file (the shard first, then the index):
    a write that fails (``fileio.DiskFull`` on a full disk) leaves the previous shard and index as they were. The
    shard has no time stamps, so the same samples give the same bytes.
    """
    path = Path(path)
    with atomic_path(index_file(path)) as index_tmp, atomic_path(path) as tmp:
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, mtime=0)
            try:
                for sample in samples:
                    writer.write(sample)
            finally:
                writer.close()  # after an error too: a tar stream left open would write to the closed file later
        index = ShardIndex(str(path), tmp.stat().st_size, sha256_file(tmp), member_offsets(tmp))
        index_tmp.write_text(json_text({"shard": path.name, "size": index.size, "sha256": index.sha256,
                                        "samples": index.samples}), encoding="utf-8")
    return index


def member_offsets(path: str | os.PathLike) -> list[dict]:
    """Per sample of a tar shard (in order): key, clip id and ``[offset, size]`` of each member's bytes."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, field = member.name.split(".", 1)
            sample = samples.setdefault(key, {"key": key, "members": {}})
            sample["members"][field] = [member.offset_data, member.size]
            if field == META_FIELD:
                sample["clip_id"] = json.loads(tar.extractfile(member).read())["clip_id"]
    return list(samples.values())


def read_index(shard: str | os.PathLike) -> ShardIndex:
    """A shard's index; DamagedShard when it is missing or unreadable."""
    path = index_file(shard)
    try:
        data = json.loads(path.read_text())
        return ShardIndex(str(shard), int(data["size"]), data["sha256"], data["samples"])
    except (OSError, ValueError, KeyError) as err:
        raise DamagedShard(f"{path}: missing or unreadable ({type(err).__name__})") from None


def check_shard(index: ShardIndex, full: bool = True) -> None:
    """Raise DamagedShard unless the shard has its recorded size (and, when ``full``, its sha256)."""
    try:
        size = os.path.getsize(index.path)
    except OSError:
        raise DamagedShard(f"{index.path}: missing") from None
    if size != index.size:
        raise DamagedShard(f"{index.path}: damaged: {size} bytes, its index records {index.size}")
    if full and sha256_file(index.path) != index.sha256:
        raise DamagedShard(f"{index.path}: damaged: its sha256 differs from the one its index records")


def map_shard(path: str | os.PathLike) -> memoryview:
    """A shard file mapped into memory, read-only: the pages a reader touches are read, and no others."""
    with open(path, "rb") as handle:
        return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))


def sample_views(shard: memoryview, sample: dict, path: str | os.PathLike) -> dict[str, memoryview]:
    """One sample's raw fields (field -> bytes-like, as ``shards.decode_sample`` takes them) as views into its mapped
    shard (``map_shard`` of ``path``), without a copy."""
    fields = {}
    for field, (start, size) in sample["members"].items():
        if start + size > len(shard):
            raise DamagedShard(f"{path}: damaged: {sample['key']}.{field} is cut short")
        fields[field] = shard[start:start + size]
    return fields


def read_samples(index: ShardIndex) -> Iterator[dict[str, memoryview]]:
    """Every sample of a shard in order, as raw fields (``shards.decode_sample`` decodes one)."""
    shard = map_shard(index.path)
    for sample in index.samples:
        yield sample_views(shard, sample, index.path)
