"""A run's history.csv, written by Keras' CSVLogger: one row per whole epoch."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from charrnn_keras import atomic


def truncate(path: Path, first_epoch: int) -> None:
    """Keeps the rows of epochs before ``first_epoch``, so a resumed run lists each epoch once.

    Rows that do not parse (a line cut short by a crash) are dropped too.

    Args:
        path: the history file (nothing happens if it does not exist).
        first_epoch: the first epoch (0-based) to be trained again.
    """
    rows = _rows(path)
    if not rows:
        return
    kept = [rows[0]] + [
        r for r in rows[1:] if len(r) == len(rows[0]) and _int(r[0]) in range(first_epoch)
    ]
    if kept != rows:
        out = io.StringIO()
        csv.writer(out).writerows(kept)
        atomic.write_text(path, out.getvalue())


def best(path: Path) -> tuple[float | None, int]:
    """Returns the best loss and the number of epochs in the history.

    CSVLogger writes ``NA`` in the val_* columns of a run without validation.

    Args:
        path: the history file.

    Returns:
        ``(best val_loss, else best loss, else None; number of rows)``.
    """
    rows = _rows(path)
    if not rows:
        return None, 0
    records = [dict(zip(rows[0], r, strict=False)) for r in rows[1:]]
    for key in ("val_loss", "loss"):
        losses = [v for r in records if (v := _float(r.get(key))) is not None]
        if losses:
            return min(losses), len(records)
    return None, len(records)


def _rows(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _float(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
