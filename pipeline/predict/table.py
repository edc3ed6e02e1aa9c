"""The table of a prediction run: one row per input in ``<out>.jsonl`` (every field) and ``<out>.csv`` (the flat
part), and the clips' embeddings in a Parquet file; written so that a run killed at any moment leaves whole rows
only, none twice, and a re-run with the same files does only what is missing.

    table = PredictionTable.open("predictions.csv", "embeddings.parquet", names=classes, model="<weights sha256>")
    todo = [item for item in inputs if not table.done(item.key())]
    table.add(row, embedding)     # kept in memory until the next commit
    table.close()                 # commits what is left

A commit replaces each file by a copy of itself with the new rows appended (written beside it, synced, renamed:
``preprocessing.fileio.atomic_path``), the embeddings first, then the JSONL, then the CSV. Commits are at least
``COMMIT_SECONDS`` apart, and at least ten times as long apart as the last one took, so rewriting stays a small
share of a long run (a kill loses at most that long's finished rows, which the next run redoes).

Opening a table reconciles what a kill between two renames can leave: the JSONL is the record (a row is done when
it is there; an ``ok`` row needs its embeddings too when an embeddings file is given), embeddings without their
row are dropped, and the CSV is rebuilt from the JSONL. Rows of another model are refused, and so is a new table
(no JSONL yet) whose CSV or embeddings file exists already. Memory holds the done keys, the failures and the rows
of one commit, whatever the number of inputs.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np

from preprocessing.errors import InputError
from preprocessing.fileio import atomic_path

from .inputs import VideoInput

COMMIT_SECONDS = 2.0
TABLE_SUFFIXES = (".csv", ".jsonl")
EMBEDDINGS = ("video", "audio", "fused")  # the names ``pipeline.predict.video.window_outputs`` gives them
FACE_COLUMNS = ("frames", "detected", "fraction", "tracks", "cuts")


class TableError(InputError, ValueError):
    """An output file that cannot take this run's rows."""


def table_paths(out: str | Path) -> tuple[Path, Path]:
    """(CSV, JSONL) of ``--out``: the file named and its sibling with the other suffix."""
    out = Path(out)
    if out.suffix.lower() not in TABLE_SUFFIXES:
        raise TableError(f"{out}: the predictions table is a .csv (with a .jsonl beside it) or a .jsonl file")
    return out.with_suffix(".csv"), out.with_suffix(".jsonl")


def row_key(row: dict) -> tuple[str, float | None, float | None]:
    return row["path"], row.get("start"), row.get("end")


def csv_columns(names: list[str]) -> list[str]:
    """The flat columns: the input, its status, the label (classification), one column per class or target, the
    face statistics and the window count."""
    fixed = ["id", "path", "start", "end", "status", "label", "duration", "windows",
             *(f"face_{name}" for name in FACE_COLUMNS)]
    clashes = sorted(set(fixed) & set(names))
    if clashes:
        raise TableError(f"model outputs named {clashes} clash with the table's own columns")
    return fixed[:6] + list(names) + fixed[6:]


def csv_cells(row: dict, names: list[str]) -> list:
    """A row's CSV cells in ``csv_columns`` order (empty where it has none, e.g. a failed input's outputs)."""
    clip = row.get("clip") or {}
    outputs = clip.get("probabilities") or clip.get("values") or {}
    face = row.get("face") or {}
    return [row["id"], row["path"], row.get("start"), row.get("end"), row["status"], clip.get("label"),
            *(outputs.get(name) for name in names), row.get("duration"), row.get("windows"),
            *(face.get(name) for name in FACE_COLUMNS)]


def csv_text(rows: list[dict], names: list[str], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(csv_columns(names))
    writer.writerows([["" if cell is None else cell for cell in csv_cells(row, names)] for row in rows])
    return buffer.getvalue()


def embeddings_table(items: list[VideoInput], embeddings: list[dict[str, np.ndarray]]):
    """A pyarrow Table: the inputs' id, path, start, end and one float32 list column per embedding."""
    import pyarrow as pa

    columns = {key: [getattr(item, key) for item in items] for key in ("id", "path", "start", "end")}
    types = {"id": pa.string(), "path": pa.string(), "start": pa.float64(), "end": pa.float64()}
    for name in EMBEDDINGS:
        if embeddings and name in embeddings[0]:
            width = len(embeddings[0][name])
            flat = np.concatenate([e[name].astype(np.float32) for e in embeddings])
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)
    return pa.table({name: pa.array(values, types[name]) if name in types else values
                     for name, values in columns.items()})


def write_embeddings(path: str | Path, items: list[VideoInput], embeddings: list[dict[str, np.ndarray]]) -> Path:
    """Write the inputs' embeddings (``embeddings_table``) to the Parquet file ``path``, replacing it."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(embeddings_table(items, embeddings), tmp)
    return Path(path)


def append_parquet(path: Path, table, drop: set[tuple] = frozenset()) -> None:
    """Replace ``path`` by its rows (less those whose key is in ``drop``) and ``table``'s (None: none), read and
    written a batch at a time."""
    import pyarrow.parquet as pq

    old = pq.ParquetFile(path) if path.exists() else None
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, old.schema_arrow if old is not None else table.schema) as writer:
            for batch in old.iter_batches(batch_size=4096) if old is not None else ():
                if drop:
                    keys = zip(*(batch.column(k).to_pylist() for k in ("path", "start", "end")), strict=True)
                    batch = batch.filter([key not in drop for key in keys])
                writer.write_batch(batch)
            if table is not None:
                writer.write_table(table)


def parquet_keys(path: Path) -> set[tuple]:
    import pyarrow.parquet as pq

    if not path.exists():
        return set()
    keys = pq.read_table(path, columns=["path", "start", "end"]).to_pydict()
    return set(zip(keys["path"], keys["start"], keys["end"], strict=True))


def append_text(path: Path, text: str) -> None:
    """Replace ``path`` by a copy of itself with ``text`` appended."""
    with atomic_path(path) as tmp:
        if path.exists():
            shutil.copyfile(path, tmp)
        with open(tmp, "a", encoding="utf-8") as handle:
            handle.write(text)


def jsonl_rows(path: Path):
    """The rows of a JSONL table, in order."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    raise TableError(f"{path}:{number}: not a row of a predictions table") from None


class PredictionTable:
    """The rows and embeddings of one run's outputs (see the module docstring); ``out`` None keeps rows in memory."""

    def __init__(self, out: str | Path | None, embeddings: str | Path | None, *, names: list[str], model: str):
        self.csv, self.jsonl = table_paths(out) if out is not None else (None, None)
        self.embeddings = Path(embeddings) if embeddings is not None else None
        self.names, self.model = list(names), model
        csv_columns(self.names)  # clashes fail before anything runs
        self.keys: set[tuple] = set()
        self.failures: dict[tuple, str] = {}  # key -> failure reason (unreadable, no_face, ...) of each failed row
        self.memory: list[dict] = []  # the rows, when there is no file to hold them
        self.pending: list[tuple[dict, dict | None]] = []
        self.appended: set[Path] = set()  # the files that have the pending rows already (a commit that failed midway)
        self.last_commit, self.commit_seconds = time.monotonic(), 0.0

    @classmethod
    def open(cls, out, embeddings, *, names: list[str], model: str) -> PredictionTable:
        """The table of ``out`` (and ``embeddings``), reconciled after a kill; its done keys read back."""
        table = cls(out, embeddings, names=names, model=model)
        if table.jsonl is not None and table.jsonl.exists():
            table._reconcile()
            return table
        for path in (table.csv, table.embeddings):
            if path is not None and path.exists():
                record = f"its table {table.jsonl} does not" if table.jsonl else "no table is kept (out=None)"
                raise TableError(f"{path}: exists, and {record}: remove it, or give another file")
        return table

    def _reconcile(self) -> None:
        with_embeddings = parquet_keys(self.embeddings) if self.embeddings is not None else None
        with atomic_path(self.jsonl) as tmp, tmp.open("w", encoding="utf-8") as handle:
            for number, row in enumerate(jsonl_rows(self.jsonl), start=1):
                if row.get("model") != self.model:
                    raise TableError(f"{self.jsonl}:{number}: a prediction of another model ({row.get('model')}, "
                                     f"not {self.model}); give another --out, or remove it")
                key = row_key(row)
                missing = with_embeddings is not None and row["status"] == "ok" and key not in with_embeddings
                if key in self.keys or missing:
                    continue
                self.keys.add(key)
                if row["status"] != "ok":
                    self.failures[key] = row["status"].split(":")[0]
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        with atomic_path(self.csv) as tmp:
            tmp.write_text(csv_text([], self.names, header=True), encoding="utf-8")
            with tmp.open("a", encoding="utf-8") as handle:
                for row in jsonl_rows(self.jsonl):
                    handle.write(csv_text([row], self.names, header=False))
        if with_embeddings is not None and self.embeddings.exists():
            ok = {row_key(row) for row in jsonl_rows(self.jsonl) if row["status"] == "ok"}
            if with_embeddings - ok:
                append_parquet(self.embeddings, None, drop=with_embeddings - ok)

    def done(self, key: tuple) -> bool:
        return key in self.keys

    def add(self, row: dict, embedding: dict[str, np.ndarray] | None = None) -> None:
        """A finished input's row (and its embeddings, when the table keeps them); committed in time."""
        row = {**row, "model": self.model}
        self.keys.add(row_key(row))
        if row["status"] != "ok":
            self.failures[row_key(row)] = row["status"].split(":")[0]
        self.pending.append((row, embedding))
        wait = max(COMMIT_SECONDS, 10 * self.commit_seconds)
        if time.monotonic() - self.last_commit >= wait:
            self.commit()

    def commit(self) -> None:
        """Append the pending rows to every file, each replaced atomically: embeddings, JSONL, CSV.

        A file that cannot take them (``fileio.DiskFull`` on a full disk) keeps its earlier rows, and so do the files
        after it; the rows stay pending, and a later commit (``close``) appends them to the files that lack them."""
        started = time.monotonic()
        rows = [row for row, _ in self.pending]
        if self.jsonl is None:
            self.memory.extend(rows)
        elif rows:
            ok = [(row, embedding) for row, embedding in self.pending if embedding is not None]
            if self.embeddings is not None and ok and self.embeddings not in self.appended:
                items = [VideoInput(**{k: row[k] for k in ("id", "path", "start", "end")}) for row, _ in ok]
                append_parquet(self.embeddings, embeddings_table(items, [embedding for _, embedding in ok]))
                self.appended.add(self.embeddings)
            if self.jsonl not in self.appended:
                append_text(self.jsonl, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
                self.appended.add(self.jsonl)
            append_text(self.csv, csv_text(rows, self.names, header=not self.csv.exists()))
        self.pending, self.appended = [], set()
        self.last_commit = time.monotonic()
        self.commit_seconds = self.last_commit - started

    def close(self) -> None:
        self.commit()

    def rows(self, inputs: list[VideoInput] | None = None) -> list[dict]:
        """The table's rows (the inputs' rows, in their order, when given)."""
        rows = self.memory if self.jsonl is None else list(jsonl_rows(self.jsonl)) if self.jsonl.exists() else []
        if inputs is None:
            return rows
        by_key = {row_key(row): row for row in rows}
        return [by_key[item.key()] for item in inputs if item.key() in by_key]
