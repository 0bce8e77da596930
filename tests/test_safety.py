"""Nothing lost, nothing wrong (issue 15): another run's checkpoint, a NaN loss with samples on,
models too large for the machine, and a full or read-only disk.

The disk tests mount a small tmpfs (``mount`` needs root; they are skipped where it is not
permitted) so that the file system really refuses the writes: a full one, or a read-only one,
which refuses root too, unlike a chmod'ed folder. The other storage tests inject the OSError
that a full disk raises.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from conftest import REPO, TINY_CONFIG, TINY_TEXT, our_stderr

from charrnn_keras import checkpoints, cli, rundir, sizing
from charrnn_keras import corpus as corpus_lib
from charrnn_keras import model as model_lib
from charrnn_keras import train as train_mod
from charrnn_keras.config import Config, ModelConfig, load_config
from charrnn_keras.errors import ConfigError, RunDirError, StorageError, TrainingStopped
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
    train = functools.partial(train_mod.train, extra_callbacks=extra)
    monkeypatch.setattr(train_mod, "train", train)


# ---------------------------------------------------------------------------------------------
# Item 3: a checkpoint of another vocabulary with the same shapes


def _other_vocab(vocab: Vocab) -> Vocab:
    """A vocabulary of the same size whose ids mean other characters."""
    chars = sorted({"z" if c == "t" else c for c in vocab.chars})
    assert len(chars) == len(vocab) and chars != vocab.chars
    return Vocab(chars)


def test_checkpoints_carry_the_vocabulary_fingerprint(tiny_run):
    _, vocab = rundir.load_run(tiny_run)
    best = checkpoints.find_checkpoint(tiny_run)
    assert model_lib.read_fingerprint(best) == model_lib.vocab_fingerprint(vocab)


def test_checkpoint_of_another_vocabulary_is_refused(tiny_run, tmp_path, capsys):
    cfg, vocab = rundir.load_run(tiny_run)
    other = _other_vocab(vocab)
    foreign = tmp_path / "other.weights.h5"
    model_lib.build_model(cfg.model, len(other), 1, 1, vocab=other).save_weights(foreign)

    model = model_lib.build_model(cfg.model, len(vocab), 1, 1)
    with pytest.raises(RunDirError) as e:
        checkpoints.load_weights(model, foreign, vocab)
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
    shutil.copyfile(checkpoints.find_checkpoint(tiny_run), old)
    with h5py.File(old, "a") as f:  # as written before checkpoints carried one
        del f.attrs[model_lib.VOCAB_ATTR]
    model = model_lib.build_model(cfg.model, len(vocab), 1, 1, vocab=vocab)
    checkpoints.load_weights(model, old)
    reference = model_lib.build_model(cfg.model, len(vocab), 1, 1)
    checkpoints.load_weights(reference, checkpoints.find_checkpoint(tiny_run), vocab)
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Item 11: a NaN loss while a sample is written after every epoch


class _PoisonWeights(keras.callbacks.Callback):
    """Makes the loss NaN at the last step of the first epoch, as a diverging run would: the
    epoch is whole, so the callbacks of its end (the sample among them) see the NaN weights."""

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.params["steps"] - 2:
            kernel = self.model.get_layer("logits").kernel
            kernel.assign(kernel * math.nan)


def test_nan_loss_with_samples_on_stops_with_one_line(tmp_path, monkeypatch, capsys, caplog):
    # The per-epoch sample ran on the NaN weights and crashed with an 85-line traceback.
    _with_callbacks(monkeypatch, _PoisonWeights())
    args = _train_args(tmp_path, tmp_path / "run", "train.sample_chars=20")
    with caplog.at_level("WARNING", logger="charrnn_keras.callbacks"):
        assert cli.main(args) == TrainingStopped.exit_code
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "loss became NaN" in line, line
    assert "epoch 1: loss is nan; no sample from these weights" in caplog.text


# ---------------------------------------------------------------------------------------------
# Item 13: sizes the machine cannot train


@pytest.mark.parametrize(
    "settings",
    [
        {"cell": "lstm"},
        {"cell": "gru", "num_layers": 3},
        {"cell": "rnn", "num_layers": 1, "embedding_dim": 5},
        {"cell": "lstm", "fast_lstm": True, "rnn_size": 7},
    ],
    ids=["lstm", "gru", "rnn", "fast_lstm"],
)
def test_parameter_estimate_is_exact(settings):
    cfg = ModelConfig(**{"embedding_dim": 8, "rnn_size": 16, "num_layers": 2, **settings})
    built = model_lib.build_model(cfg, 23, 2, 4)
    assert sizing.estimate_params(cfg, 23) == built.count_params()


def test_memory_check_refuses_with_the_estimate_and_what_to_lower():
    cfg = Config()
    cfg.model.rnn_size, cfg.data.batch_size = 2048, 1  # the weights dominate
    need = sizing.estimate_memory(cfg, 80)
    sizing.check_fits(cfg, 80, memory=need)  # exactly enough: no error
    with pytest.raises(ConfigError) as e:
        sizing.check_fits(cfg, 80, memory=need - 1)
    assert f"{sizing.estimate_params(cfg.model, 80):,} weights" in str(e.value)
    assert "lower model.rnn_size or model.num_layers" in str(e.value)
    cfg.data.batch_size, cfg.data.seq_length = 4096, 4096  # the activations dominate
    with pytest.raises(ConfigError, match="lower data.batch_size or data.seq_length"):
        sizing.check_fits(cfg, 80, memory=2**30)


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("model.rnn_size=1000000", "the model does not fit in memory: 12,000,"),
        ("model.num_layers=100000", "model.num_layers = 100000 is more than 64"),
    ],
    ids=["rnn_size", "num_layers"],
)
def test_too_large_model_is_refused_before_the_run_dir_exists(tmp_path, capsys, setting, expected):
    # rnn_size=1000000 died by OOM and left a run directory that then refused to resume;
    # num_layers=100000 spent minutes building.
    run = tmp_path / "run"
    assert cli.main(_train_args(tmp_path, run, setting)) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert expected in line and "lower model." in line, line
    assert not run.exists()


# ---------------------------------------------------------------------------------------------
# Item 14: full and read-only disks (injected)


def test_full_corpus_cache_is_a_storage_error_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "text.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    cache = tmp_path / "cache"
    save = np.save

    def save_then_fill_the_disk(file, arr, *args, **kwargs):
        save(file, arr[:10], *args, **kwargs)  # part of the file, then the disk is full
        raise ENOSPC

    monkeypatch.setattr(corpus_lib.np, "save", save_then_fill_the_disk)
    with pytest.raises(StorageError, match=f"{cache} is full") as e:
        corpus_lib.load_corpus(str(path), 10**6, cache)
    assert "\n" not in str(e.value)
    assert list(cache.iterdir()) == [], "no temporary and no half-written cache left"


def test_weights_write_on_a_full_disk_is_a_storage_error(tmp_path, monkeypatch):
    model = model_lib.build_model(load_config(TINY_CONFIG).model, 15, 1, 1)
    best = tmp_path / "best.weights.h5"
    model.save_weights(best)
    before = best.read_bytes()

    def write_part_then_fail(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"\x89HDF\r\n\x1a\n")
        raise ENOSPC

    monkeypatch.setattr(keras.Model, "save_weights", write_part_then_fail)
    with pytest.raises(StorageError, match=f"{tmp_path} is full"):
        model.save_weights(best)
    assert best.read_bytes() == before, "the previous checkpoint is kept whole"
    assert _temps(tmp_path) == []


def test_weights_that_cannot_fit_are_refused_before_hdf5_writes(tmp_path, monkeypatch):
    # h5py meeting a full disk raises in destructors and the process dies by SIGSEGV (139).
    model = model_lib.build_model(load_config(TINY_CONFIG).model, 15, 1, 1)
    written = []
    monkeypatch.setattr(keras.Model, "save_weights", lambda *a, **k: written.append(a))
    usage = shutil.disk_usage(tmp_path)
    small = usage._replace(free=model.weights_file_bytes() - 1)
    monkeypatch.setattr(model_lib.shutil, "disk_usage", lambda path: small)
    with pytest.raises(StorageError, match="is full"):
        model.save_weights(tmp_path / "best.weights.h5")
    assert written == []


def test_backup_copy_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    copyfile = shutil.copyfile

    def fail_in_backup(src, dst, *args, **kwargs):
        if Path(dst).parent.name == "backup":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", fail_in_backup)
    run = tmp_path / "run"
    assert cli.main(_train_args(tmp_path, run, "train.epochs=2")) == StorageError.exit_code
    line = _one_error_line(capsys.readouterr().err, "train")
    assert f"{run / 'backup'} is full" in line, line


def test_export_to_a_forbidden_dir_is_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    # What a chmod'ed export dir gives a user who is not root (root ignores permissions).
    from charrnn_keras import atomic

    real_mkdir = Path.mkdir

    def refuse_temporaries(path, *args, **kwargs):
        if atomic.is_temp(path.name):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse_temporaries)
    export_dir = tmp_path / "export"
    argv = ["export", "--run-dir", str(tiny_run), "--export-dir", str(export_dir)]
    assert cli.main(argv) == StorageError.exit_code
    line = _one_error_line(capsys.readouterr().err, "export")
    assert f"Permission denied; make {export_dir / 'charrnn'} writable" in line, line


# ---------------------------------------------------------------------------------------------
# Item 14: full and read-only disks (real, on a tmpfs)


@pytest.fixture
def tmpfs():
    """Mounts a tmpfs: ``mount(path, size, read_only=False)``; skips where mount is refused."""
    mounted = []

    def mount(path: Path, size: str, read_only: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "charrnn_keras.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_training_onto_a_full_disk_is_one_line(tmp_path, tmpfs):
    # Two 660 KB checkpoints fill 2 MB: h5py met the full disk and the process died by SIGSEGV.
    disk = tmpfs(tmp_path / "disk", "2m")
    run = disk / "run"
    args = _train_args(tmp_path, run, "model.rnn_size=64", "train.epochs=6")
    done = _cli(*args, cwd=tmp_path)
    assert done.returncode == StorageError.exit_code, done.stderr
    line = _one_error_line(done.stderr, "train")
    assert "is full (" in line and "MiB free)" in line, line
    assert _temps(disk) == []


@pytest.mark.parametrize("inside", [False, True], ids=["run-dir", "its-parent"])
def test_read_only_run_dir_is_one_line(tmp_path, tmpfs, inside):
    disk = tmpfs(tmp_path / "disk", "1m", read_only=True)
    run = disk / "run" if inside else disk  # inside: the corpus cache beside it fails first
    done = _cli(*_train_args(tmp_path, run), cwd=tmp_path)
    assert done.returncode == StorageError.exit_code, done.stderr
    line = _one_error_line(done.stderr, "train")
    assert f"Read-only file system; make {disk} writable" in line, line
    assert not (disk / "run").exists()


@pytest.mark.parametrize(
    "size, read_only, expected",
    [("1m", True, "Read-only file system; make {disk} writable"), ("100k", False, "is full (")],
    ids=["read-only", "full"],
)
def test_export_to_a_read_only_or_full_dir_is_one_line(
    tiny_run, tmp_path, tmpfs, size, read_only, expected
):
    # A full disk gave a ResourceExhaustedError traceback.
    disk = tmpfs(tmp_path / "disk", size, read_only)
    done = _cli("export", "--run-dir", str(tiny_run), "--export-dir", str(disk), cwd=tmp_path)
    assert done.returncode == StorageError.exit_code, done.stderr
    line = _one_error_line(done.stderr, "export")
    assert expected.format(disk=disk) in line, line
    assert _temps(disk) == []
