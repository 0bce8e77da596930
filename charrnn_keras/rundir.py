"""The run directory: everything a run needs to be resumed, sampled or exported.

Layout::

    <run>/config.toml          resolved config (what `charrnn train` actually used)
    <run>/run.json             status, corpus facts, best validation loss
    <run>/vocab.json           the vocabulary
    <run>/checkpoints/best.weights.h5                best validation loss so far
    <run>/checkpoints/i{step}_l{units}_v{val}.weights.h5   periodic (train.checkpoint_every)
    <run>/backup/              the training backup (kept until the run is finished)
    <run>/history.csv          one row per whole epoch
    <run>/logs/                TensorBoard
    <run>/train.lock           held by the `charrnn train` using the run; holds its pid

Every file is written through ``atomic``, so a kill never leaves half a file under its name.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import glob
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from charrnn_keras import atomic
from charrnn_keras import history as history_csv
from charrnn_keras.checkpoints import BEST, CHECKPOINT_DIR, checkpoint_step, periodic_checkpoints
from charrnn_keras.config import Config, ConfigError, load_config
from charrnn_keras.errors import RunDirError, option
from charrnn_keras.vocab import Vocab

CONFIG_FILE = "config.toml"
RUN_FILE = "run.json"
VOCAB_FILE = "vocab.json"
BACKUP_DIR = "backup"
HISTORY = "history.csv"
LOGS = "logs"
LOCK_FILE = "train.lock"

logger = logging.getLogger(__name__)


class Status(enum.StrEnum):
    """A run's state in run.json; only FINISHED runs are never resumed."""

    RUNNING = "running"  # being trained, or killed while it was
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM: resumable
    FAILED = "failed"  # the loss became non-finite: resumable from the last finite epoch
    STOPPED = "stopped"  # train.max_minutes ran out: resumable with a new budget
    FINISHED = "finished"  # every epoch trained; the backup is gone


def read_run_info(run_dir: str | Path) -> dict:
    """Returns run.json's contents, or {} if the run has none yet."""
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(info, dict) else "not a JSON object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = str(e)
    if problem is not None:
        raise RunDirError(
            f"{path} is damaged ({problem}); it should be JSON written by training: restore "
            f"it from a copy, or pass {option('overwrite', True)} to start the run again"
        )
    return info


def load_run(run_dir: str | Path) -> tuple[Config, Vocab]:
    """Reads a run's config and vocabulary.

    Args:
        run_dir: a directory written by ``charrnn train``.

    Returns:
        ``(config, vocab)``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist; train one with charrnn train")
    if not (run_dir / CONFIG_FILE).exists():
        raise RunDirError(f"{run_dir} is not a run directory: it has no {CONFIG_FILE}")
    try:
        cfg = load_config(run_dir / CONFIG_FILE)
    except ConfigError as e:
        raise RunDirError(str(e)) from None
    return cfg, Vocab.load(run_dir / VOCAB_FILE)


RUNS = "runs"  # where runs without an explicit run directory go


def run_series(config_name: str, root: str | Path = RUNS) -> list[Path]:
    """Returns the runs a config made without an explicit run directory, oldest first.

    ``charrnn train --config NAME.toml`` uses ``runs/NAME``, then ``runs/NAME-2``,
    ``runs/NAME-3``, ... after each finished one.

    Args:
        config_name: the config file's stem (``default`` without a config).
        root: the folder holding them.

    Returns:
        The existing ones, by number.
    """
    base = Path(root) / config_name
    numbered = {1: base} if base.exists() else {}
    for path in Path(root).glob(f"{glob.escape(config_name)}-*"):
        suffix = path.name[len(config_name) + 1 :]
        if suffix.isascii() and suffix.isdigit() and int(suffix) >= 2:
            numbered[int(suffix)] = path
    return [numbered[n] for n in sorted(numbered)]


def next_in_series(config_name: str, root: str | Path = RUNS) -> Path:
    """Where a config's next run goes: after its newest one (``runs/NAME`` -> ``runs/NAME-2``)."""
    series = run_series(config_name, root)
    base = Path(root) / config_name
    if not series:
        return base
    last = series[-1].name.removeprefix(config_name).removeprefix("-")
    return base.with_name(f"{config_name}-{int(last or 1) + 1}")


def newest_run(config_name: str, root: str | Path = RUNS) -> Path:
    """The newest run of a config's series, or where its first run would go."""
    series = run_series(config_name, root)
    return series[-1] if series else Path(root) / config_name


class RunDir:
    """One run directory: its paths, its status in run.json, its history and its lock.

    Args:
        path: the directory (it need not exist yet).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / CONFIG_FILE
        self.run_file = self.path / RUN_FILE
        self.vocab_file = self.path / VOCAB_FILE
        self.checkpoints = self.path / CHECKPOINT_DIR
        self.best = self.checkpoints / BEST
        self.backup = self.path / BACKUP_DIR
        self.history = self.path / HISTORY
        self.logs = self.path / LOGS
        self.lock_file = self.path / LOCK_FILE

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def info(self) -> dict:
        """Returns run.json's contents, or {} if there is none yet."""
        return read_run_info(self.path)

    def status(self) -> Status | None:
        """Returns the recorded status, or None if the run has none (or one we do not know)."""
        try:
            return Status(self.info().get("status"))
        except ValueError:
            return None

    def is_ours(self) -> bool:
        """Whether the directory was written by ``charrnn train`` (a run.json or config.toml of
        ours); anything else must never be replaced."""
        try:
            if self.status() is not None:
                return True
        except RunDirError:
            pass
        try:
            load_config(self.config_file)
        except (ConfigError, OSError):
            return False
        return True

    def is_empty(self) -> bool:
        """Whether the directory is missing or holds nothing (a lock file of ours aside)."""
        if not self.path.is_dir():
            return not self.path.exists()
        return all(p.name == LOCK_FILE for p in self.path.iterdir())

    def create(self, cfg: Config, vocab: Vocab, info: dict) -> None:
        """Writes a new run's files: run.json, vocab.json, then config.toml.

        config.toml is written last: its presence means "resume", and resuming needs the
        other two.
        """
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.write_info(info)
        vocab.save(self.vocab_file)
        atomic.write_text(self.config_file, cfg.to_toml())

    def write_info(self, info: dict) -> None:
        """Replaces run.json with ``info``."""
        atomic.write_json(self.run_file, info)

    def record(self, status: Status, **facts) -> dict:
        """Sets the status in run.json, with ``facts`` to add or update; returns the new info."""
        info = {**self.info(), **facts, "status": Status(status)}
        self.write_info(info)
        return info

    def remove_stale_temps(self) -> list[Path]:
        """Deletes temporary files left by killed writers; returns them."""
        return [p for d in (self.path, self.checkpoints, self.backup)
                for p in atomic.remove_stale(d)]  # fmt: skip

    def remove_checkpoints_after(self, step: int) -> list[Path]:
        """Deletes periodic checkpoints of steps after ``step`` (to be trained again)."""
        removed = [p for p in periodic_checkpoints(self.path) if checkpoint_step(p.name) > step]
        for path in removed:
            path.unlink(missing_ok=True)
            logger.info("removed %s: its step is trained again", path.name)
        return removed

    def truncate_history(self, first_epoch: int) -> None:
        """Keeps the history rows of epochs before ``first_epoch``, so each epoch appears once."""
        history_csv.truncate(self.history, first_epoch)

    def history_best(self) -> tuple[float | None, int]:
        """Returns (best val_loss, else best loss, number of epochs) from the history."""
        return history_csv.best(self.history)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Holds the run's lock, so that one ``charrnn train`` at a time uses the directory.

        The lock is an ``flock`` on train.lock, released by the kernel when the process ends
        however it ends, so a killed run never leaves its directory locked.
        """
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise atomic.storage_error(e, self.lock_file) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise atomic.storage_error(e, self.lock_file) from None
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                raise RunDirError(
                    f"{self.path} is in use by another charrnn train (pid {holder}); wait for "
                    f"it to end or stop it, or choose another {option('run_dir')}"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            yield
        finally:
            os.close(fd)  # closing the last descriptor releases the flock
