"""A run's checkpoints: the periodic files' names, which weights to load, loading them.

``checkpoints/best.weights.h5`` holds the best validation loss so far, and
``checkpoints/i{step}_l{units}_v{val}.weights.h5`` the periodic ones (``train.checkpoint_every``).
Sampling, export and a finished run's sample load the best, else the latest; every file carries
its vocabulary's fingerprint, so weights of another vocabulary are refused in one line.
"""

from __future__ import annotations

import re
from pathlib import Path

from charrnn_keras.errors import RunDirError, option
from charrnn_keras.vocab import Vocab

CHECKPOINT_DIR = "checkpoints"
BEST = "best.weights.h5"

# Periodic checkpoints: one format to write and one pattern to read it back. ``{loss:.3f}``
# spells a non-finite loss "nan", "inf" or "-inf", which the pattern accepts too.
_PERIODIC_FORMAT = "i{step}_l{units}_v{loss:.3f}.weights.h5"
_PERIODIC = re.compile(
    r"i(?P<step>\d+)_l(?P<units>\d+)_v(?P<loss>-?(?:\d+\.\d+|nan|inf))\.weights\.h5"
)


def checkpoint_name(step: int, units: int, loss: float) -> str:
    """Returns the file name of the periodic checkpoint of ``step``.

    Args:
        step: training steps since the run began.
        units: ``model.rnn_size``.
        loss: the validation (or training) loss at that step; may be non-finite.

    Returns:
        ``i{step}_l{units}_v{loss:.3f}.weights.h5``.
    """
    return _PERIODIC_FORMAT.format(step=step, units=units, loss=float(loss))


def checkpoint_step(name: str) -> int | None:
    """Returns the step of a periodic checkpoint's file name, or None for any other name."""
    m = _PERIODIC.fullmatch(name)
    return int(m.group("step")) if m else None


def periodic_checkpoints(run_dir: str | Path) -> list[Path]:
    """Returns the run's periodic checkpoints, oldest step first."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    found = [(step, p) for p in ckpt_dir.glob("i*.weights.h5")
             if (step := checkpoint_step(p.name)) is not None]  # fmt: skip
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
