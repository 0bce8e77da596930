"""Shared fixtures: tiny texts and a tiny trained run directory."""

from __future__ import annotations

import os
import signal
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# A shell without job control starts a background job (`make test &`, a CI runner's script)
# with SIGINT ignored, and an ignored signal stays ignored in every child: the Ctrl-C tests'
# `charrnn` processes would never see it. A handler of our own is reset by exec instead.
signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.toml"

# Repetitive on purpose: a 16-unit model learns it in a few epochs.
TINY_TEXT = "the cat sat on the mat.\nthe dog sat on the log.\nthe cat and the dog sat.\n" * 12


# TensorFlow's start-up lines (absl, oneDNN, CUDA); once they are silenced this filter can go.
_TF_STARTUP = ("WARNING: All log messages before absl", "I0000", "E0000", "W0000")


def our_stderr(text: str) -> list[str]:
    """Returns the lines of a subprocess's stderr that this package wrote.

    Args:
        text: the whole stderr.

    Returns:
        Its lines without TensorFlow's start-up lines.
    """
    return [line for line in text.splitlines() if not line.startswith(_TF_STARTUP)]


@pytest.fixture
def tiny_text_file(tmp_path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


def make_tiny_run(run_dir: Path, cell: str = "lstm", epochs: int = 3) -> Path:
    """Trains the tiny config on TINY_TEXT into ``run_dir`` with the real training code."""
    from charrnn_keras.config import load_config
    from charrnn_keras.train import train

    data = run_dir.parent / f"{run_dir.name}-corpus.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    cfg = load_config(
        TINY_CONFIG, [f"model.cell={cell}", f"train.epochs={epochs}", "train.sample_chars=0"]
    )
    train(cfg, data=str(data), run_dir=run_dir, verbose=0)
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny LSTM run directory, shared by the whole session (treat as read-only)."""
    return make_tiny_run(tmp_path_factory.mktemp("runs") / "tiny")
