"""What to predict on: video files, folders of them, and clip lists, as one list of inputs, each file and segment
once.

    inputs = collect_inputs(["talk.mp4", "videos/", "list.csv"])
    inputs[0]   # VideoInput(id='talk.mp4', path='/home/me/talk.mp4', start=None, end=None)

- A file is taken whatever its suffix (one that does not exist, or does not decode, gets a failure row).
- A folder is searched recursively for files with a video suffix (``VIDEO_SUFFIXES``, any case), in sorted
  order; names starting with a dot (hidden files, macOS ``._*`` shadows) are skipped.
- A ``.csv`` / ``.jsonl`` file is a clip list, the format of the custom dataset adapter
  (``preprocessing.datasets.clip_list``): a ``path`` column (absolute, or relative to the list's folder), and
  optional ``start`` / ``end`` seconds; labels and any other column are not read. A listed file that is
  missing gets a failure row; a list whose format is wrong fails at once, one line per problem.

An input's id is its path as you named it, normalised (``videos/a.mp4``; a list's relative paths joined to the
list's own path), with ``@<start>-<end>`` for a segment. What makes two inputs the same, for taking each once
and for resuming a run, is its ``key``: the absolute path and the segment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from preprocessing.datasets.clip_list import LIST_SUFFIXES, listed_media, read_clip_list, segment_suffix
from preprocessing.errors import InputError

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp", ".ts",
                  ".mts", ".ogv", ".vob")


class InputsError(InputError, ValueError):
    """An argument that names no input: an empty folder, a clip list that cannot be read."""


@dataclass(frozen=True)
class VideoInput:
    """One video (or segment of one) to predict on: its id, its absolute path, the segment in seconds."""

    id: str
    path: str
    start: float | None = None
    end: float | None = None

    def key(self) -> tuple[str, float | None, float | None]:
        return self.path, self.start, self.end

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "start": self.start, "end": self.end}


def file_input(named: str | os.PathLike, start: float | None = None, end: float | None = None) -> VideoInput:
    """The input of a file as named (relative to the working folder, or absolute)."""
    name = os.path.normpath(os.path.expanduser(os.fspath(named)))
    return VideoInput(name + segment_suffix(start, end), os.path.abspath(name), start, end)


def folder_inputs(folder: Path) -> list[VideoInput]:
    """The video files below ``folder``, sorted by their path inside it, hidden ones left out."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() not in VIDEO_SUFFIXES:
            continue
        if path.is_file():
            found.append(relative)
    if not found:
        raise InputsError(f"{folder}: no video files in this folder or below (suffixes {' '.join(VIDEO_SUFFIXES)})")
    return [file_input(folder / relative) for relative in sorted(found, key=lambda p: p.as_posix())]


def list_inputs(list_file: Path) -> list[VideoInput]:
    """The rows of a clip list; a wrong format raises the list's problems, one line each."""
    clips = read_clip_list(list_file)
    media = listed_media(clips)
    clips.problems.check()
    return [file_input(os.path.join(os.path.dirname(list_file), os.path.expanduser(item.row.get("path"))),
                       item.start, item.end) for item in media]


def collect_inputs(arguments: list[str | os.PathLike]) -> list[VideoInput]:
    """Files, folders and clip lists (see the module docstring) -> inputs in the order given, each key once."""
    if not arguments:
        raise InputsError("no videos given: name video files, folders or clip lists (.csv, .jsonl)")
    inputs: dict[tuple, VideoInput] = {}
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = folder_inputs(path)
        elif path.suffix.lower() in LIST_SUFFIXES:
            found = list_inputs(path)
        else:
            found = [file_input(argument)]
        for item in found:
            inputs.setdefault(item.key(), item)
    return list(inputs.values())
