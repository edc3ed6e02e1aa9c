"""Writing files so that no reader ever sees half of one, and hashing them.

Every file the pipeline writes goes through ``atomic_path``: the bytes go to a temporary file beside the
target (same folder, so the same filesystem), are flushed to disk, and the file is renamed over the target.
A process killed at any point leaves either the old file or the new one, plus at most a temporary file
matching ``TEMP_GLOB`` that the next run may delete.

    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(out / "metrics.json", {"war": 0.8})
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_GLOB = ".*.tmp"  # what ``atomic_path``'s temporary files look like, for cleaning up after killed runs


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on success it is synced and renamed onto ``path``.

    If the block raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, payload: object) -> Path:
    """Pretty, key-sorted JSON, written atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in blocks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
