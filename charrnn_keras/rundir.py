"""The run directory: everything a run needs to be resumed, sampled or exported.

Layout::

    <run>/config.toml          resolved config (what `charrnn train` actually used)
    <run>/run.json             status, corpus facts, best validation loss
    <run>/vocab.json           the vocabulary
    <run>/checkpoints/best.weights.h5                best validation loss so far
    <run>/checkpoints/i{step}_l{units}_v{val}.weights.h5   periodic (train.checkpoint_every)
    <run>/backup/              Keras BackupAndRestore state (deleted when the run finishes)
    <run>/history.csv          one row per epoch
    <run>/logs/                TensorBoard
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from charrnn_keras.config import Config, ConfigError, load_config
from charrnn_keras.errors import RunDirError, option
from charrnn_keras.vocab import VOCAB_FILE, Vocab

CONFIG_FILE = "config.toml"
RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
BEST = "best.weights.h5"
BACKUP_DIR = "backup"
HISTORY = "history.csv"
LOGS = "logs"
_PERIODIC = re.compile(r"i(\d+)_l\d+_v[\d.]+(nan|inf)?\.weights\.h5$")
# Temporary names of atomic writes: CharRNN.save_weights and backup.RunBackup.
_TEMP = re.compile(r"\..+\.tmp(\d+)(\.weights\.h5|\.part)$")

logger = logging.getLogger(__name__)


def read_run_info(run_dir: str | Path) -> dict:
    """Returns run.json's contents, or {} if the run has none yet."""
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(
            f"{path} is damaged ({e}); it should be JSON written by training: restore it "
            f"from a copy, or pass {option('overwrite', True)} to start the run again"
        ) from None


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


def periodic_checkpoints(run_dir: str | Path) -> list[Path]:
    """Returns the run's periodic checkpoints, oldest step first."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("i*.weights.h5")
             if (m := _PERIODIC.match(p.name))]  # fmt: skip
    return [p for _, p in sorted(found)]


def find_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Chooses the weights to load: ``checkpoint`` if given, else the best, else the latest.

    Args:
        run_dir: the run directory.
        checkpoint: a weights file; a bare name is looked up in the run's checkpoints/.

    Returns:
        The path of an existing ``.weights.h5`` file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist; train one with charrnn train")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists() and (run_dir / CHECKPOINT_DIR / path).exists():
            path = run_dir / CHECKPOINT_DIR / path
        if not path.exists():
            raise RunDirError(f"checkpoint {checkpoint} does not exist")
        return path
    best = run_dir / CHECKPOINT_DIR / BEST
    if best.exists():
        return best
    periodic = periodic_checkpoints(run_dir)
    if periodic:
        return periodic[-1]
    raise RunDirError(
        f"{run_dir} holds no checkpoint yet; train until the first epoch ends "
        f"(or pass {option('checkpoint')})"
    )


def load_weights(model, path: str | Path, vocab: Vocab | None = None) -> None:
    """Loads weights into ``model``; a damaged file or another vocabulary's gets one line.

    Args:
        model: a model from ``model.build_model``.
        path: a ``.weights.h5`` file.
        vocab: the vocabulary the weights must belong to; default the one the model was
            built for (its ``vocab_sha256``), if any. Files without a fingerprint (written
            before checkpoints carried one) load without the check.
    """
    from charrnn_keras.model import read_fingerprint, vocab_fingerprint  # imports Keras

    expected = getattr(model, "vocab_sha256", None)
    if vocab is not None:
        expected = vocab_fingerprint(vocab)
    try:
        found = read_fingerprint(path) if expected else None
    except Exception:  # a damaged file: model.load_weights below says how
        found = None
    if found and found != expected:
        raise RunDirError(
            f"checkpoint {path} was trained on another vocabulary (sha256 {found[:12]}) than "
            f"this run's (sha256 {expected[:12]}): its character ids mean other characters; "
            f"pick a checkpoint of this run with {option('checkpoint')}"
        )
    try:
        model.load_weights(path)
    except Exception as e:  # h5py and Keras raise many types for a bad file
        detail = " ".join(str(e).split())[:200]  # Keras' messages span lines; ours is one
        raise RunDirError(
            f"checkpoint {path} cannot be loaded ({type(e).__name__}: {detail}); "
            f"it is damaged or from another model; pick another with {option('checkpoint')}"
        ) from None


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Deletes temporary files that killed processes left behind in ``directory``.

    Weights and backups are written under a temporary name carrying the writer's process id,
    then renamed; a process killed in between leaves the temporary file. Files of processes
    that are still running are kept.

    Returns:
        The deleted files.
    """
    directory = Path(directory)
    removed = []
    for path in directory.iterdir() if directory.is_dir() else ():
        m = _TEMP.match(path.name)
        if m and path.is_file() and not _alive(int(m.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
            logger.info("removed %s, left by an interrupted write", path)
    return removed


def _alive(pid: int) -> bool:
    """Whether another process with this id is running (ids are reused, e.g. in containers)."""
    if pid == os.getpid():
        return False  # called while setting up, when this process has no write in flight
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True
