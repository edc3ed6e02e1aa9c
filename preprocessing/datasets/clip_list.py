"""Clip lists: a CSV file (with a header row) or a JSONL file (one object a line) naming media files in a ``path``
column, read once and checked as a whole, every problem reported with the list file and its line.

    clips = read_clip_list(Path("/data/mine/list.csv"))
    media = listed_media(clips)          # [ListedMedia(line=2, path=/data/mine/clips/a b.mp4, start=None, ...), ...]
    clips.problems.check()               # one DatasetLayoutError, one line per problem: list.csv:<line>: <problem>

Column names are matched case-insensitively, surrounding spaces ignored; columns nobody reads are ignored.
A ``path`` is absolute or relative to the list file's folder and may hold spaces and any other character (CSV
quotes a path with a comma). ``start`` and ``end`` (seconds, optional; empty: the file's start or end) cut a
segment of a longer file. Line numbers are the file's: a CSV's header is line 1, its first clip line 2.

The custom dataset adapter (``custom.py``) and prediction over many videos (``pipeline.predict_many``) read
lists with these functions.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from preprocessing.datasets._layout import DatasetLayoutError

LIST_SUFFIXES = (".csv", ".jsonl")
SHOWN_PROBLEMS = 30


class ListProblems:
    """The problems found in one clip list; ``check`` raises them as one error, one line each, in line order."""

    def __init__(self, list_file: Path):
        self.list_file = list_file
        self.found: list[tuple[int, str]] = []  # (line, 0 for the whole list; the message)

    def add(self, line: int | None, problem: str) -> None:
        """A problem of line ``line`` (None: of the whole list)."""
        self.found.append((line or 0, f"{self.list_file}{f':{line}' if line else ''}: {problem}"))

    def check(self) -> None:
        """Raise a DatasetLayoutError listing the first ``SHOWN_PROBLEMS`` problems, if there are any."""
        if self.found:
            ordered = [message for _, message in sorted(self.found, key=lambda problem: problem[0])]
            shown = ordered[:SHOWN_PROBLEMS]
            more = [f"... and {len(ordered) - len(shown)} more"] if len(ordered) > len(shown) else []
            raise DatasetLayoutError("\n".join(shown + more))


@dataclass(frozen=True)
class ListRow:
    """One clip line of a list: its line number and its cells, by lower-case column name, as stripped text."""

    line: int
    fields: dict[str, str]

    def get(self, column: str) -> str:
        return self.fields.get(column, "")


@dataclass
class ClipList:
    """A list file's rows; ``header`` is a CSV's columns (None for JSONL, whose rows each name their own)."""

    path: Path
    header: list[str] | None
    rows: list[ListRow]
    problems: ListProblems = field(repr=False)

    def has(self, column: str) -> bool:
        """Whether the list has the column at all (a CSV header names it; some JSONL row has it)."""
        if self.header is not None:
            return column in self.header
        return any(column in row.fields for row in self.rows)

    def require(self, column: str) -> bool:
        """Report a missing column (a CSV: once, on the header line; JSONL: each row without it); True if none is."""
        if self.header is not None:
            if column not in self.header:
                self.problems.add(1, f"no column {column!r} (columns: {', '.join(self.header)})")
                return False
            return True
        missing = [row for row in self.rows if column not in row.fields]
        for row in missing:
            self.problems.add(row.line, f"no {column!r}")
        return not missing


@dataclass(frozen=True)
class ListedMedia:
    """A list row's media: the absolute, normalised file path and the segment (seconds; None: the file's start or
    end), with the row."""

    row: ListRow
    path: Path
    start: float | None
    end: float | None

    @property
    def line(self) -> int:
        return self.row.line

    def key(self) -> tuple[str, float | None, float | None]:
        """What makes two rows the same clip: the file and the segment."""
        return str(self.path), self.start, self.end


def read_clip_list(path: str | os.PathLike) -> ClipList:
    """The rows of a ``.csv`` or ``.jsonl`` clip list; problems of its format are collected, not raised (an
    unreadable list is raised at once: nothing else can be checked)."""
    path = Path(path)
    problems = ListProblems(path)
    if path.suffix.lower() not in LIST_SUFFIXES:
        problems.add(None, f"a clip list is a {' or '.join(LIST_SUFFIXES)} file")
        problems.check()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        problems.add(None, f"cannot be read ({err.strerror or err})")
        problems.check()
    if path.suffix.lower() == ".csv":
        header, rows = _csv_rows(text, problems)
    else:
        header, rows = None, _jsonl_rows(text, problems)
    if not rows and not problems.found:
        problems.add(None, "the list has no clips")
    return ClipList(path, header, rows, problems)


def _csv_rows(text: str, problems: ListProblems) -> tuple[list[str], list[ListRow]]:
    reader = csv.reader(text.splitlines(keepends=True))
    header = [name.strip().lower() for name in next(reader, [])]
    if not any(header):
        problems.add(None, "the list is empty: a CSV clip list starts with a header row (path,label,...)")
        return [], []
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        problems.add(1, f"column(s) {', '.join(map(repr, repeated))} appear more than once")
    rows, line = [], reader.line_num + 1
    for record in reader:
        if any(cell.strip() for cell in record):
            if len(record) != len(header):
                problems.add(line, f"{len(record)} fields, the header has {len(header)}")
            else:
                rows.append(ListRow(line, {name: cell.strip() for name, cell in zip(header, record, strict=True)}))
        line = reader.line_num + 1
    return header, rows


def _jsonl_rows(text: str, problems: ListProblems) -> list[ListRow]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as err:
            problems.add(line, f"not valid JSON ({err})")
            continue
        if not isinstance(record, dict):
            problems.add(line, "not a JSON object")
            continue
        fields, bad = {}, []
        for name, value in record.items():
            if value is None or isinstance(value, str | int | float) and not isinstance(value, bool):
                fields[str(name).strip().lower()] = "" if value is None else str(value).strip()
            else:
                bad.append(repr(name))
        if bad:
            problems.add(line, f"{', '.join(bad)}: not text or a number")
        else:
            rows.append(ListRow(line, fields))
    return rows


def media_path(list_file: Path, text: str) -> Path:
    """A ``path`` cell as an absolute, normalised path: absolute as written (``~`` expanded), or relative to the
    list file's folder. Symbolic links are kept as they are."""
    path = Path(text).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else list_file.absolute().parent / path))


def _seconds(row: ListRow, column: str, problems: ListProblems) -> float | None:
    text = row.get(column)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        problems.add(row.line, f"{column} {text!r} is not a number of seconds >= 0")
        return None
    return value


def listed_media(clips: ClipList) -> list[ListedMedia]:
    """Every row's media file and segment; an empty path or a bad segment is a problem (the row is left out)."""
    if not clips.require("path"):
        return []
    media = []
    for row in clips.rows:
        if not row.get("path"):
            clips.problems.add(row.line, "empty path")
            continue
        before = len(clips.problems.found)
        start, end = _seconds(row, "start", clips.problems), _seconds(row, "end", clips.problems)
        if end is not None and end <= (start or 0.0):
            clips.problems.add(row.line, f"end {end:g} is not after start {start or 0.0:g}")
        if len(clips.problems.found) == before:
            media.append(ListedMedia(row, media_path(clips.path, row.get("path")), start, end))
    return media


def first_of_each(media: list[ListedMedia]) -> tuple[list[ListedMedia], list[tuple[ListedMedia, ListedMedia]]]:
    """The rows with a file and segment not listed before, and (repeat, first) pairs for the others."""
    first: dict[tuple, ListedMedia] = {}
    repeats = []
    for item in media:
        if item.key() in first:
            repeats.append((item, first[item.key()]))
        else:
            first[item.key()] = item
    return list(first.values()), repeats


def segment_suffix(start: float | None, end: float | None) -> str:
    """What a segment adds to a clip's name: ``@<start>-<end>`` (``@12.5-15``; ``end`` when it runs to the end
    of the file), nothing for a whole file."""
    if start is None and end is None:
        return ""
    return f"@{format(start or 0.0, '.15g')}-{'end' if end is None else format(end, '.15g')}"


def clip_name(item: ListedMedia, base: Path) -> str:
    """A clip's id: its path relative to ``base`` when inside it (forward slashes), else the absolute path, with
    its ``segment_suffix``."""
    base = Path(os.path.normpath(base.absolute()))
    name = item.path.relative_to(base).as_posix() if item.path.is_relative_to(base) else item.path.as_posix()
    return name + segment_suffix(item.start, item.end)
