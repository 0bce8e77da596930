"""Choosing and resuming a run directory, and reading its CSV history.

A run directory is resumed when it holds an unfinished run with the same data layout, model and
corpus; a finished one is never overwritten without ``--overwrite``.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from pathlib import Path

from charrnn_keras import data as data_lib
from charrnn_keras import rundir as rd
from charrnn_keras.config import Config
from charrnn_keras.errors import RunDirError, option
from charrnn_keras.vocab import format_chars


def resolve_run_dir(run_dir, config_name: str, overwrite: bool) -> Path:
    """Picks the run directory: the given one, or ``runs/<config_name>[-N]``.

    Without ``run_dir``, the newest ``runs/<config_name>*`` is resumed if unfinished, and a
    new numbered one is started after a finished one.

    Returns:
        The directory to train in (may not exist yet).
    """
    if run_dir is None:
        base = Path("runs") / config_name
        candidates = [base] + [base.with_name(f"{base.name}-{n}") for n in range(2, 10_000)]
        existing = [c for c in candidates if c.exists()]
        if not existing:
            return base
        last = max(existing, key=candidates.index)
        if rd.read_run_info(last).get("status") != "finished" or overwrite:
            return resolve_run_dir(last, config_name, overwrite)
        return candidates[candidates.index(last) + 1]
    run_dir = Path(run_dir)
    info = rd.read_run_info(run_dir)
    if info.get("status") == "finished":
        if not overwrite:
            raise RunDirError(
                f"{run_dir} holds a finished run; pass {option('overwrite', True)} to replace it, "
                f"or choose another {option('run_dir')}"
            )
        shutil.rmtree(run_dir)
    elif run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    elif run_dir.is_file() or (
        run_dir.is_dir()
        and any(run_dir.iterdir())
        # run.json is written first: a run killed while being set up has it, not config.toml
        and not any((run_dir / name).exists() for name in (rd.CONFIG_FILE, rd.RUN_FILE))
    ):
        raise RunDirError(
            f"{run_dir} exists and is not a run directory; choose another {option('run_dir')}"
        )
    return run_dir


# How the LSTM is computed, not what: the weights are the same, so a run may change them.
SPEED_KEYS = {"model.fast_lstm", "model.matmul_dtype", "model.chains", "model.time_chunks"}


def check_resume(run_dir: Path, cfg: Config, corpus: data_lib.Corpus) -> None:
    """Refuses to resume a run whose model, data layout or corpus differ from this one."""
    old_cfg, old_vocab = rd.load_run(run_dir)
    diffs = [
        f"{section}.{key}: {old!r} -> {new!r}"
        for section in ("data", "model")
        for key, old in old_cfg.to_dict()[section].items()
        if (new := cfg.to_dict()[section][key]) != old and f"{section}.{key}" not in SPEED_KEYS
    ]
    old_digest = rd.read_run_info(run_dir).get("data", {}).get("sha256")
    if old_digest and old_digest != corpus.digest:
        diffs.append(f"corpus: {corpus.source} is not the text the run started on")
    elif old_vocab != corpus.vocab:
        added = sorted(set(corpus.vocab.chars) - set(old_vocab.chars))
        removed = sorted(set(old_vocab.chars) - set(corpus.vocab.chars))
        diffs.append(
            f"vocabulary: {len(old_vocab)} -> {len(corpus.vocab)} characters"
            + (f", new {format_chars(added[:10])}" if added else "")
            + (f", gone {format_chars(removed[:10])}" if removed else "")
        )
    if diffs:
        raise RunDirError(
            f"cannot resume {run_dir}: it was started with different settings ("
            + "; ".join(diffs)
            + f"); use the same settings, another {option('run_dir')}, "
            f"or {option('overwrite', True)}"
        )


def truncate_history(path: Path, first_epoch: int) -> None:
    """Drops CSV rows for epochs a resumed run will train again, so each epoch appears once.

    Rows that do not parse (a line cut short by a crash) are dropped too.
    """
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [
        r for r in rows[1:] if len(r) == len(rows[0]) and _int(r[0]) in range(first_epoch)
    ]
    data_lib.write_text_atomic(_csv_text(kept), path)


def _csv_text(rows) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def history_best(path: Path) -> tuple[float | None, int]:
    """Returns (best val_loss, else best loss, number of epochs) from the CSV history.

    CSVLogger writes ``NA`` in the val_* columns of a run without validation.
    """
    if not path.exists():
        return None, 0
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for key in ("val_loss", "loss"):
        losses = [v for r in rows if (v := _float(r.get(key))) is not None]
        if losses:
            return min(losses), len(rows)
    return None, len(rows)


def _float(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
