"""Shared adapter helpers: checking a dataset folder, indexing its media, failing with one clear error.

Every adapter checks the whole folder before it returns anything, and every problem it finds is reported
through ``DatasetLayoutError``: the message names the dataset, what is missing or malformed (the first few
offending paths) and the layout the adapter expected (the block after ``Expected layout::`` in the
adapter's module docstring).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from preprocessing.errors import InputError
from preprocessing.manifest import ClipRecord, DatasetInfo, validate_clips

SHOWN_PATHS = 5


class DatasetLayoutError(InputError, ValueError):
    """A dataset folder is not laid out the way its adapter expects."""


def expected_layout(module_doc: str | None) -> str:
    """The indented block that follows the ``Expected layout::`` line of an adapter's docstring."""
    lines = (module_doc or "").splitlines()
    for start, line in enumerate(lines):
        if line.rstrip().endswith("Expected layout::"):
            block = []
            for text in lines[start + 1:]:
                if text.strip() and not text.startswith(" "):
                    break
                block.append(text)
            return "\n".join(block).strip("\n")
    return "(see the adapter's documentation)"


def layout_error(dataset: str, problem: str, offending: Iterable[object], layout: str) -> DatasetLayoutError:
    """Build the one error an adapter raises: dataset, problem, first few offending paths, expected layout."""
    offending = [str(item) for item in offending]
    shown = offending[:SHOWN_PATHS]
    more = f"\n  ... and {len(offending) - len(shown)} more" if len(offending) > len(shown) else ""
    listed = "".join(f"\n  {item}" for item in shown) + more
    return DatasetLayoutError(f"{dataset}: {problem}{listed}\nExpected layout:\n{layout}")


class LayoutChecker:
    """Collects the checks of one dataset folder; ``fail`` raises the one error."""

    def __init__(self, dataset: str, root: Path, module_doc: str | None) -> None:
        self.dataset = dataset
        self.root = Path(root)
        self.layout = expected_layout(module_doc)

    def fail(self, problem: str, offending: Iterable[object] = ()) -> DatasetLayoutError:
        return layout_error(self.dataset, problem, offending, self.layout)

    def require(self, *relative: str) -> None:
        """Fail unless the root and every listed path under it exist."""
        if not self.root.is_dir():
            raise self.fail("the dataset folder does not exist or is not a folder", [self.root])
        missing = [self.root / rel for rel in relative if not (self.root / rel).exists()]
        if missing:
            raise self.fail("missing required files or folders", missing)

    def check_empty(self, problem: str, offending: Sequence[object]) -> None:
        """Fail with ``problem`` when ``offending`` is not empty."""
        if offending:
            raise self.fail(f"{problem} ({len(offending)})", offending)

    def rel(self, path: Path) -> str:
        """``path`` relative to the dataset root, with forward slashes."""
        return path.relative_to(self.root).as_posix()

    def index_media(self, under: str, pattern: str, suffixes: Sequence[str]) -> dict[str, str]:
        """Map clip id -> root-relative path for the files below ``under`` whose stem fully matches
        ``pattern`` and whose suffix (lower-case) is one of ``suffixes``; a clip id found twice fails."""
        regex = re.compile(pattern)
        found: dict[str, str] = {}
        duplicates = []
        for path in sorted((self.root / under).rglob("*")):
            if path.suffix.lower() not in suffixes or not regex.fullmatch(path.stem) or not path.is_file():
                continue
            if path.stem in found:
                duplicates.append(path)
                continue
            found[path.stem] = self.rel(path)
        self.check_empty("the same clip appears in more than one media file", duplicates)
        return found

    def read_csv(self, relative: str | Path, columns: Sequence[str], delimiter: str = ",") -> list[dict]:
        """Rows of a CSV file with a header that must contain ``columns`` (matched case-insensitively;
        the returned rows use the names given in ``columns``)."""
        path = self.root / relative
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = [name.strip().lower() for name in next(reader, [])]
            absent = [name for name in columns if name.lower() not in header]
            if absent:
                raise self.fail(f"label file has no column(s) {absent} (header: {header})", [path])
            where = {name: header.index(name.lower()) for name in columns}
            return [{name: row[i].strip() for name, i in where.items()} for row in reader if any(row)]


def folds_from_test_lists(check: LayoutChecker, test_lists: dict[int, list[tuple[str, str]]]
                          ) -> dict[str, tuple[int, str]]:
    """clip id -> (test fold, label) from official per-fold test lists of (clip id, label) pairs; a clip
    in two test lists fails."""
    assigned: dict[str, tuple[int, str]] = {}
    conflicts = []
    for fold, pairs in sorted(test_lists.items()):
        for clip_id, label in pairs:
            if clip_id in assigned:
                conflicts.append(f"{clip_id}: test fold {assigned[clip_id][0]} and {fold}")
            assigned[clip_id] = (fold, label)
    check.check_empty("clips listed in more than one test split", conflicts)
    return assigned


def block_fold(index: int, block: int, num_folds: int) -> int:
    """1-based fold of the ``index``-th (0-based) group when folds are contiguous blocks of ``block``
    groups and the last fold takes the remainder."""
    return min(index // block, num_folds - 1) + 1


def finish(info: DatasetInfo, clips: Iterable[ClipRecord]) -> tuple[DatasetInfo, list[ClipRecord]]:
    """Sort clips by id (every adapter's deterministic order) and run the manifest's cross-row checks."""
    ordered = sorted(clips, key=lambda clip: clip.clip_id)
    validate_clips(info, ordered)
    return info, ordered
