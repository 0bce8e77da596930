"""Nothing lost, nothing wrong (issue 15): another run's checkpoint, a NaN loss with samples on,
models too large for the machine, and a full or read-only disk.

The disk tests mount a small tmpfs (``mount`` needs root; they are skipped where it is not
permitted) so that the file system really refuses the writes: a full one, or a read-only one,
which refuses root too, unlike a chmod'ed folder. The other storage tests inject the OSError
that a full disk raises.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TINY_CONFIG, TINY_TEXT, our_stderr

from charrnn_keras import cli, rundir
from charrnn_keras import model as model_lib
from charrnn_keras import train as train_mod
from charrnn_keras.errors import RunDirError
from charrnn_keras.vocab import Vocab

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write to a full disk raises


def _one_error_line(stderr: str, command: str) -> str:
    """Returns the CLI's error line, checking that everything else on stderr is a log line."""
    lines = our_stderr(stderr)
    assert lines and lines[-1].startswith(f"charrnn {command}: error: "), stderr
    assert all(line.startswith(("INFO ", "WARNING ")) for line in lines[:-1]), stderr
    return lines[-1]


def _temps(root: Path) -> list[str]:
    """Temporaries under ``root``: ``.name.tmpPID`` (``name.tmp`` before atomic.py), ``tmp-*``."""
    found = root.rglob("*")
    return [str(p.relative_to(root)) for p in found if ".tmp" in p.name or "tmp-" in p.name]


def _train_args(tmp_path: Path, run_dir: Path, *settings: str) -> list[str]:
    data = tmp_path / "text.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    args = ["train", "--config", str(TINY_CONFIG), "--data", str(data), "--run-dir", str(run_dir),
            "--quiet", "--set", "train.epochs=1", "--set", "train.sample_chars=0"]  # fmt: skip
    for setting in settings:
        args += ["--set", setting]
    return args


def _with_callbacks(monkeypatch, *extra) -> None:
    """Puts ``extra`` callbacks first in every ``train`` call of this test."""
    make_callbacks = train_mod._callbacks

    def with_extra(*args, **kwargs):
        callbacks, budget = make_callbacks(*args, **kwargs)
        return [*extra, *callbacks], budget

    monkeypatch.setattr(train_mod, "_callbacks", with_extra)


# ---------------------------------------------------------------------------------------------
# Item 3: a checkpoint of another vocabulary with the same shapes


def _other_vocab(vocab: Vocab) -> Vocab:
    """A vocabulary of the same size whose ids mean other characters."""
    chars = sorted({"z" if c == "t" else c for c in vocab.chars})
    assert len(chars) == len(vocab) and chars != vocab.chars
    return Vocab(chars)


def test_checkpoints_carry_the_vocabulary_fingerprint(tiny_run):
    _, vocab = rundir.load_run(tiny_run)
    best = rundir.find_checkpoint(tiny_run)
    assert model_lib.read_fingerprint(best) == model_lib.vocab_fingerprint(vocab)


def test_checkpoint_of_another_vocabulary_is_refused(tiny_run, tmp_path, capsys):
    cfg, vocab = rundir.load_run(tiny_run)
    other = _other_vocab(vocab)
    foreign = tmp_path / "other.weights.h5"
    model_lib.build_model(cfg.model, len(other), 1, 1, vocab=other).save_weights(foreign)

    model = model_lib.build_model(cfg.model, len(vocab), 1, 1)
    with pytest.raises(RunDirError) as e:
        rundir.load_weights(model, foreign, vocab)
    message = str(e.value)
    assert f"checkpoint {foreign} was trained on another vocabulary" in message
    assert model_lib.vocab_fingerprint(other)[:12] in message
    assert model_lib.vocab_fingerprint(vocab)[:12] in message
    assert "\n" not in message

    assert cli.main(["sample", "--run-dir", str(tiny_run), "--checkpoint", str(foreign)]) == 2
    line = _one_error_line(capsys.readouterr().err, "sample")
    assert "another vocabulary" in line and "--checkpoint" in line, line

    export_dir = tmp_path / "export"
    argv = ["export", "--run-dir", str(tiny_run), "--checkpoint", str(foreign),
            "--export-dir", str(export_dir)]  # fmt: skip
    assert cli.main(argv) == 2
    assert "another vocabulary" in _one_error_line(capsys.readouterr().err, "export")
    assert not export_dir.exists() or not any(export_dir.rglob("saved_model.pb"))


def test_checkpoint_without_a_fingerprint_still_loads(tiny_run, tmp_path):
    cfg, vocab = rundir.load_run(tiny_run)
    old = tmp_path / "old.weights.h5"
    shutil.copyfile(rundir.find_checkpoint(tiny_run), old)
    with h5py.File(old, "a") as f:  # as written before checkpoints carried one
        del f.attrs[model_lib.VOCAB_ATTR]
    model = model_lib.build_model(cfg.model, len(vocab), 1, 1, vocab=vocab)
    rundir.load_weights(model, old)
    reference = model_lib.build_model(cfg.model, len(vocab), 1, 1)
    rundir.load_weights(reference, rundir.find_checkpoint(tiny_run), vocab)
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
