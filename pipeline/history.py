"""Per-epoch metrics as CSV: one row per epoch, what training writes (``history.csv``) and the report reads."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path


def history_csv(history: list[dict]) -> bytes:
    """Per-epoch metrics dicts as CSV bytes; the columns in order of first appearance."""
    columns = list(dict.fromkeys(name for epoch in history for name in epoch))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue().encode()


def read_history(path: Path) -> list[dict[str, float]]:
    """A ``history.csv`` as per-epoch dicts of floats (NaN where a value is empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no epoch rows")
    return [{name: float(value) if value not in ("", None) else math.nan for name, value in row.items()}
            for row in rows]
