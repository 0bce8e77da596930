"""What to do with the run directory ``charrnn train`` is given: start, resume or replace.

A run directory is resumed when it holds an unfinished run with the same data layout, model and
corpus. A finished one is replaced only with ``overwrite``, and ``overwrite`` replaces only a
run directory of ours that does not hold the corpus, and only once the new run is set up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from charrnn_keras import atomic
from charrnn_keras import corpus as corpus_lib
from charrnn_keras.config import Config
from charrnn_keras.errors import RunDirError, option
from charrnn_keras.rundir import RunDir, Status, load_run, newest_run, next_in_series
from charrnn_keras.vocab import format_chars

logger = logging.getLogger(__name__)


def resolve_run_dir(run_dir, config_name: str, overwrite: bool) -> Path:
    """Picks the run directory: the given one, or ``runs/<config_name>[-N]``; changes nothing.

    Without ``run_dir``, the newest ``runs/<config_name>*`` is resumed if unfinished (or
    replaced with ``overwrite``), and a new numbered one is started after a finished one.

    Args:
        run_dir: the directory asked for, or None.
        config_name: names the default directory.
        overwrite: whether a finished run may be replaced.

    Returns:
        The directory to train in (may not exist yet).
    """
    if run_dir is None:
        last = newest_run(config_name)
        if not last.exists() or RunDir(last).status() != Status.FINISHED or overwrite:
            return resolve_run_dir(last, config_name, overwrite)
        return next_in_series(config_name)
    run = RunDir(run_dir)
    if run.status() == Status.FINISHED and not overwrite:
        raise RunDirError(
            f"{run.path} holds a finished run; pass {option('overwrite', True)} to replace it, "
            f"or choose another {option('run_dir')}"
        )
    # A run killed while being set up has a run.json of ours (written first), no config.toml.
    if run.path.is_file() or not (run.is_empty() or run.is_ours()):
        raise _not_a_run(run, overwrite)
    return run.path


def _not_a_run(run: RunDir, overwrite: bool) -> RunDirError:
    only = f"{option('overwrite', True)} only replaces run directories; " if overwrite else ""
    return RunDirError(
        f"{run.path} exists and is not a run directory; {only}choose another {option('run_dir')}"
    )


def check_replaceable(run: RunDir, data: str | None) -> None:
    """Refuses ``overwrite`` unless ``run`` is a run directory of ours without the corpus.

    Args:
        run: the directory ``overwrite`` would replace.
        data: the corpus path given to training (None for the built-in one).
    """
    if not run.is_ours():
        raise _not_a_run(run, overwrite=True)
    if data is not None:
        corpus, here = Path(data).resolve(), run.path.resolve()
        if corpus == here or here in corpus.parents:
            raise RunDirError(
                f"{run.path} holds the corpus {data}; {option('overwrite', True)} would delete "
                f"it: move the corpus out of the run directory or choose another "
                f"{option('run_dir')}"
            )


# Keys a resumed run may change: how the LSTM is computed, not what (the weights are the same),
# and how fresh weights are drawn (a resumed run loads its own).
RESUMABLE_KEYS = {"model.fast_lstm", "model.matmul_dtype", "model.chains", "model.time_chunks",
                  "model.lstm_loop", "model.init"}  # fmt: skip


def check_resume(run: RunDir | str | Path, cfg: Config, corpus: corpus_lib.Corpus) -> None:
    """Refuses to resume a run whose model, data layout, corpus or weight average differ.

    Args:
        run: the run directory (a RunDir or its path).
        cfg: the settings asked for now.
        corpus: the corpus loaded now.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    old_cfg, old_vocab = load_run(run.path)
    diffs = [
        f"{section}.{key}: {old!r} -> {new!r}"
        for section in ("data", "model")
        for key, old in old_cfg.to_dict()[section].items()
        if (new := cfg.to_dict()[section][key]) != old and f"{section}.{key}" not in RESUMABLE_KEYS
    ]
    old_ema, new_ema = old_cfg.train.ema, cfg.train.ema
    if bool(old_ema) != bool(new_ema):  # the momentum may change; having an average may not
        diffs.append(
            f"train.ema: {old_ema!r} -> {new_ema!r}, the optimizer state "
            + ("holds a moving average" if old_ema else "has no moving average")
        )
    old_digest = run.info().get("data", {}).get("sha256")
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
            f"cannot resume {run.path}: it was started with different settings ("
            + "; ".join(diffs)
            + f"); use the same settings, another {option('run_dir')}, "
            f"or {option('overwrite', True)}"
        )


@contextlib.contextmanager
def staged_replacement(run: RunDir):
    """Yields a new, empty RunDir beside ``run``; on success it takes ``run``'s place.

    The old run is deleted only after the new one is set up; if setting it up fails, the old
    run is left as it was. Only a kill between the two renames below leaves the old run under
    ``.<name>.replaced<pid>`` with nothing under its name.
    """
    staged = RunDir(atomic.temp_path(run.path))
    aside = run.path.with_name(f".{run.path.name}.replaced{os.getpid()}")
    try:
        staged.path.mkdir()
    except OSError as e:
        raise atomic.storage_error(e, staged.path) from None
    try:
        yield staged
        try:
            os.rename(run.path, aside)
            try:
                os.rename(staged.path, run.path)
            except OSError:
                os.rename(aside, run.path)
                raise
        except OSError as e:
            raise atomic.storage_error(e, run.path) from None
    finally:
        shutil.rmtree(staged.path, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    logger.info("replaced the run in %s", run.path)
