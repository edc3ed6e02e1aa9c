"""Writing files so that no reader ever sees half of one, and hashing them.

Every file the pipeline writes goes through ``atomic_path``: the bytes go to a temporary file beside the
target (same folder, so the same filesystem), are flushed to disk, and the file is renamed over the target.
A process killed at any point leaves either the old file or the new one, plus at most a temporary file
matching ``TEMP_GLOB`` that the next run may delete. A write that runs out of space (a full disk or quota) leaves
the old file too, removes its temporary file and raises ``DiskFull``, one line naming the file.

    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(out / "metrics.json", {"war": 0.8})
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from preprocessing.errors import InputError

TEMP_GLOB = ".*.tmp"  # what ``atomic_path``'s temporary files look like, for cleaning up after killed runs
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_WORDS = ("No space left on device", "Disk quota exceeded")  # how errors that lost their errno say it
KEPT = "nothing of this write is left and the file is as it was before it"


class DiskFull(InputError, OSError):
    """A write that ran out of space (the disk, or the user's quota, is full). ``str()`` is one line: the file or
    folder it was writing, that the disk is full, and what was left as it was. ``errno`` is ENOSPC."""

    def __init__(self, path: str | os.PathLike, kept: str = KEPT):
        super().__init__(errno.ENOSPC, f"no space left on the device (the disk is full): {kept}; free some space "
                                       "and run again", str(path))
        self.kept = kept

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"

    def __reduce__(self):  # pickled as its own arguments (it crosses process boundaries: Ray tasks and workers)
        return type(self), (self.filename, self.kept)


def out_of_space(err: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """Whether ``err`` (or an error it was raised from) is a write that ran out of space: ENOSPC or EDQUOT, an
    error that says so in words, or any error of a write into ``folder`` while its filesystem has no free block
    left (torch.save, for one, reports a short write as ``unexpected pos``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_SPACE or any(w in str(err) for w in NO_SPACE_WORDS):
            return True
        err = err.__cause__ or err.__context__
    if folder is None:
        return False
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:  # gone, or not a local path
        return False


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on success it is synced and renamed onto ``path``.

    If the block raises, the temporary file is removed and ``path`` is left as it was; if it ran out of space
    (``out_of_space``), the error is ``DiskFull`` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
            os.replace(tmp, path)
        except DiskFull:
            raise
        except Exception as err:
            if out_of_space(err, tmp.parent if tmp.exists() else None):
                raise DiskFull(path) from err
            raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_text(payload: object) -> str:
    """Pretty, key-sorted JSON with a final newline: what ``write_json`` writes."""
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def write_json(path: str | os.PathLike, payload: object) -> Path:
    """Pretty, key-sorted JSON (``json_text``), written atomically."""
    return atomic_write_text(path, json_text(payload))


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in blocks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
