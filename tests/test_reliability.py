"""Reliability (issue 6, training and input): crashes, damaged run directories, bad input.

Each test proves one row of the README's "Reliability" table. The crash tests kill a real
``charrnn train`` (run by a small driver script that only adds the kill) at a chosen point, then
run the same command again in this process, to spare a second TensorFlow start, and check that
the run resumed from its last backup, trained exactly the epochs that were not backed up, and
left a consistent run directory.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import keras
import pytest
from conftest import TINY_CONFIG, TINY_TEXT

from charrnn_keras import atomic, checkpoints, cli, rundir
from charrnn_keras import train as train_mod
from charrnn_keras.config import load_config
from charrnn_keras.errors import CharRNNError, TrainingStopped
from charrnn_keras.model import build_model
from charrnn_keras.rundir import RunDirError

EPOCHS = 2  # the crash tests kill in the last epoch (index 1), after one epoch is backed up

# Runs `charrnn train ARGS` and sends itself SIGNAL at POINT of epoch AT (0-based). Everything
# else is the real command; the hooks only observe, except the one that kills.
DRIVER = textwrap.dedent("""
    import functools
    import os
    import signal
    import sys

    import keras

    from charrnn_keras import cli, train

    point, sig, at = sys.argv[1], getattr(signal, sys.argv[2]), int(sys.argv[3])
    epoch = [None]


    def die():
        os.kill(os.getpid(), sig)


    class Killer(keras.callbacks.Callback):
        def on_epoch_begin(self, e, logs=None):
            epoch[0] = e

        def on_train_batch_end(self, batch, logs=None):
            if point == "mid-epoch" and epoch[0] == at and batch == 1:
                die()

        def on_test_batch_end(self, batch, logs=None):
            if point == "validation" and epoch[0] == at and batch == 0:
                die()


    train.train = functools.partial(train.train, extra_callbacks=[Killer()])
    save_weights = keras.Model.save_weights


    def save_then_die(self, filepath, *args, **kwargs):
        save_weights(self, filepath, *args, **kwargs)
        name = os.path.basename(str(filepath))
        # A temporary name (".best.tmp123.weights.h5"): the file is written, not yet renamed.
        if epoch[0] == at and point in name and not name.startswith(point):
            die()


    keras.Model.save_weights = save_then_die
    sys.exit(cli.main(sys.argv[4:]))
""")


class _Crash(BaseException):
    """Stands in for SIGKILL in-process: nothing in train() or Keras catches a BaseException,
    so the run directory is left exactly as a kill at the same line would leave it."""


def _args(tmp_path: Path, *extra: str, text: str = TINY_TEXT) -> list[str]:
    data = tmp_path / "text.txt"
    if not data.exists():
        data.write_text(text, encoding="utf-8")
    return ["train", "--config", str(TINY_CONFIG), "--data", str(data),
            "--run-dir", str(tmp_path / "run"), "--quiet", "--set", f"train.epochs={EPOCHS}",
            "--set", "train.sample_chars=0", *extra]  # fmt: skip


KILLS = {  # test id: (point, signal)
    "mid-epoch": ("mid-epoch", "SIGKILL"),
    "validation": ("validation", "SIGKILL"),
    "best": ("best", "SIGKILL"),
    "latest": ("latest", "SIGKILL"),
    "ctrl-c": ("mid-epoch", "SIGINT"),
}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory) -> dict:
    """Runs every entry of KILLS in its own directory, all at once (most of each run is
    TensorFlow starting, so they overlap well); returns {id: (directory, process)}."""
    procs = {}
    for name, (point, sig) in KILLS.items():
        base = tmp_path_factory.mktemp(name)
        driver = base / "driver.py"
        driver.write_text(DRIVER)
        argv = [sys.executable, str(driver), point, sig, "1", *_args(base)]
        procs[name] = (base, subprocess.Popen(argv, cwd=base, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))  # fmt: skip
    runs = {}
    for name, (base, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        runs[name] = (base, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return runs


def _train_recording(monkeypatch, argv, extra_callbacks=()):
    """Runs ``charrnn train`` in this process; returns (exit status, epochs it trained)."""
    trained = []

    class Recorder(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            trained.append(epoch)

    original = train_mod.train
    callbacks = [Recorder(), *extra_callbacks]
    monkeypatch.setattr(train_mod, "train", functools.partial(original, extra_callbacks=callbacks))
    try:
        return cli.main(argv), trained
    finally:
        monkeypatch.setattr(train_mod, "train", original)


def _epochs(run: Path) -> list[int]:
    with open(run / "history.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def _temps(run: Path) -> list[str]:
    return [str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name]


def _assert_h5_files_whole(run: Path) -> None:
    """Every weights file under its real name opens and every array in it reads."""
    for path in [*run.rglob("*.weights.h5"), *run.rglob("*.weights.h5.bkp")]:
        if ".tmp" in path.name:
            continue
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)


def _assert_finished(run: Path, epochs: int = EPOCHS) -> None:
    assert _epochs(run) == list(range(epochs)), "each epoch exactly once, in order"
    assert _temps(run) == [], "no temporary file left behind"
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert not (run / "backup").exists()
    _assert_h5_files_whole(run)


def _one_error_line(stderr: str, command: str = "train") -> str:
    """Returns the CLI's error line, checking it is the only one and nothing follows it."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"charrnn {command}:")]
    assert len(lines) == 1, stderr
    assert stderr.rstrip().endswith(lines[0]), f"the message goes on after its line: {stderr}"
    assert "Traceback" not in stderr, stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Crashes during training


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, history, left_behind",
    [
        ("mid-epoch", [0], None),
        ("validation", [0], None),
        # Killed after writing the temporary file, before the rename: best is saved before the
        # history row is written, the backup after it.
        ("best", [0], "checkpoints"),
        ("latest", [0, 1], "backup"),
    ],
    ids=["mid-epoch", "validation", "best", "latest"],
)
def test_sigkill_then_same_command_resumes_and_finishes(
    killed_runs, monkeypatch, point, history, left_behind
):
    tmp_path, killed = killed_runs[point]
    assert killed.returncode == -signal.SIGKILL, f"never reached {point}: {killed.stderr[-2000:]}"
    run = tmp_path / "run"
    assert _epochs(run) == history
    _assert_h5_files_whole(run)  # what sits under a real name is whole, even mid-write
    if left_behind:  # the kill really was mid-write
        assert [p for p in (run / left_behind).iterdir() if ".tmp" in p.name]

    status, trained = _train_recording(monkeypatch, _args(tmp_path))
    assert status == 0
    assert trained == [1], "resumes after the backed-up epoch, trains only the lost one"
    _assert_finished(run)


def _crash_at(monkeypatch, target, name, when=lambda *a, **k: True):
    original = getattr(target, name)

    def crash(*args, **kwargs):
        if when(*args, **kwargs):
            raise _Crash(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, crash)
    return original


def test_crash_between_history_row_and_backup_keeps_each_epoch_once(tmp_path, monkeypatch):
    # Keras' BackupAndRestore first in the list saved the epoch before CSVLogger wrote its row:
    # a crash in between lost the row for good. Now the backup is written last.
    original = _crash_at(monkeypatch, keras.callbacks.CSVLogger, "on_epoch_end",
                         when=lambda self, epoch, logs=None: epoch == 1)  # fmt: skip
    with pytest.raises(_Crash):
        cli.main(_args(tmp_path))
    monkeypatch.setattr(keras.callbacks.CSVLogger, "on_epoch_end", original)
    status, trained = _train_recording(monkeypatch, _args(tmp_path))
    assert status == 0 and trained == [1]
    _assert_finished(tmp_path / "run")


def test_crash_after_training_before_finished_trains_nothing_again(tmp_path, monkeypatch):
    from charrnn_keras import atomic

    run = tmp_path / "run"
    original = _crash_at(monkeypatch, atomic, "write_json",
                         when=lambda path, obj: obj.get("status") == "finished")  # fmt: skip
    with pytest.raises(_Crash):
        cli.main(_args(tmp_path))
    monkeypatch.setattr(atomic, "write_json", original)
    best = (run / "checkpoints" / "best.weights.h5").read_bytes()
    status, trained = _train_recording(monkeypatch, _args(tmp_path))
    assert status == 0
    assert trained == [], "all epochs were done: nothing is retrained"
    assert (run / "checkpoints" / "best.weights.h5").read_bytes() == best
    _assert_finished(run)


def test_crash_while_setting_up_the_run_dir_starts_afresh(tmp_path, monkeypatch):
    from charrnn_keras.vocab import Vocab

    # Only the run's vocab.json, not the corpus cache's <digest>.vocab.json.
    original = _crash_at(monkeypatch, Vocab, "save",
                         when=lambda self, path: Path(path).name == "vocab.json")  # fmt: skip
    with pytest.raises(_Crash):
        cli.main(_args(tmp_path))
    monkeypatch.setattr(Vocab, "save", original)
    assert (tmp_path / "run").is_dir()
    status, trained = _train_recording(monkeypatch, _args(tmp_path))
    assert status == 0 and trained == [0, 1]
    _assert_finished(tmp_path / "run")


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_saying_where_it_resumes(killed_runs, monkeypatch):
    tmp_path, killed = killed_runs["ctrl-c"]
    assert killed.returncode == 130, killed.stderr[-2000:]
    line = _one_error_line(killed.stderr)
    assert "backed up after epoch 1 of 2" in line, line
    assert "Run the same command again to resume from epoch 2" in line, line
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert _temps(run) == []

    status, trained = _train_recording(monkeypatch, _args(tmp_path))
    assert status == 0 and trained == [1], "resumes where the message said"
    _assert_finished(run)


class _PoisonWeights(keras.callbacks.Callback):
    """Makes the loss NaN in the middle of epoch 1, as a diverging run would."""

    def on_train_batch_end(self, batch, logs=None):
        if batch == 2 and self._epoch == 1:
            kernel = self.model.get_layer("logits").kernel
            kernel.assign(kernel * math.nan)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


def test_nan_loss_keeps_the_last_finite_backup(tmp_path, monkeypatch, capsys):
    # Keras backs up at every epoch end, NaN or not: the resume started from NaN weights.
    status, _ = _train_recording(monkeypatch, _args(tmp_path), [_PoisonWeights()])
    assert status == TrainingStopped.exit_code  # 1: not a usage error
    line = _one_error_line(capsys.readouterr().err)
    assert "loss became NaN" in line and "resume from epoch 2" in line, line
    status, trained = _train_recording(monkeypatch, _args(tmp_path))
    assert status == 0 and trained == [1]
    run = tmp_path / "run"
    _assert_finished(run)
    with open(run / "history.csv", newline="") as f:
        assert all(math.isfinite(float(r["loss"])) for r in csv.DictReader(f))


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def three_epoch_backup(tmp_path_factory):
    """A run of 3 epochs stopped at the start of epoch 3: its backup holds epoch 2 (newest)
    and epoch 1 (the .bkp fallback). Copy it before changing it."""
    base = tmp_path_factory.mktemp("backup")
    with pytest.MonkeyPatch.context() as mp:
        status, trained = _train_recording(
            mp, _args(base, "--set", "train.epochs=3"), [_Interrupt(2)]
        )
    assert status == 130 and trained == [0, 1, 2]
    backup = base / "run" / "backup"
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2
    assert json.loads((backup / "training_metadata.json.bkp").read_text())["epoch"] == 1
    return base


def _copy(base: Path, tmp_path: Path) -> Path:
    shutil.copytree(base, tmp_path, dirs_exist_ok=True)
    return tmp_path / "run" / "backup"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_model_weights(path: Path) -> None:
    cfg = load_config(TINY_CONFIG, ["model.rnn_size=8"])
    model = build_model(cfg.model, 15, 4, 8)
    model.save_weights(path)


# The "other model" backup has no optimizer state; Keras says so while loading it, as expected.
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer:UserWarning")
@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: _truncate(b / "latest.weights.h5"), id="truncated-weights"),
        pytest.param(lambda b: (b / "latest.weights.h5").write_bytes(b""), id="empty-weights"),
        pytest.param(lambda b: _other_model_weights(b / "latest.weights.h5"), id="other-model"),
        pytest.param(lambda b: (b / "training_metadata.json").write_text('{"ep'), id="metadata"),
    ],
)
def test_damaged_backup_falls_back_to_previous_epoch(
    three_epoch_backup, tmp_path, monkeypatch, caplog, damage
):
    damage(_copy(three_epoch_backup, tmp_path))
    status, trained = _train_recording(monkeypatch, _args(tmp_path, "--set", "train.epochs=3"))
    assert status == 0
    assert trained == [1, 2], "resumed from the .bkp copy (epoch 1)"
    _assert_finished(tmp_path / "run", epochs=3)
    assert "latest.weights.h5" in caplog.text and "damaged" in caplog.text


def test_damaged_backup_without_fallback_is_one_clear_line(
    three_epoch_backup, tmp_path, monkeypatch, capsys
):
    backup = _copy(three_epoch_backup, tmp_path)
    _truncate(backup / "latest.weights.h5")
    (backup / "latest.weights.h5.bkp").write_bytes(b"not hdf5 at all")
    argv = _args(tmp_path, "--set", "train.epochs=3")
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{backup / 'latest.weights.h5'} (OSError" in line, line
    assert f"Delete {backup}" in line, line
    assert _epochs(tmp_path / "run") == [0, 1], "the refused resume changed nothing"

    shutil.rmtree(backup)  # what the message says to do
    status, trained = _train_recording(monkeypatch, argv)
    assert status == 0 and trained == [0, 1, 2]
    _assert_finished(tmp_path / "run", epochs=3)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("vocab.json", '{"chars": ["a"', "vocabulary file {run}/vocab.json is damaged"),
        ("config.toml", "[model\nrnn_size = ", "config file {run}/config.toml is not valid TOML"),
        ("run.json", '{"status": "run', "{run}/run.json is damaged"),
    ],
    ids=["vocab.json", "config.toml", "run.json"],
)
def test_damaged_run_files_refuse_resume_naming_the_file(
    three_epoch_backup, tmp_path, capsys, name, content, expected
):
    _copy(three_epoch_backup, tmp_path)
    run = tmp_path / "run"
    (run / name).write_text(content)
    assert cli.main(_args(tmp_path, "--set", "train.epochs=3")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert expected.format(run=run) in line, line


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(_truncate, id="truncated"),
        pytest.param(lambda p: p.write_bytes(b"\x89HDF\r\n" + b"\0" * 100), id="garbage"),
    ],
)
def test_damaged_checkpoint_is_one_clear_line(tiny_run, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    best = run / "checkpoints" / "best.weights.h5"
    damage(best)
    cfg, vocab = rundir.load_run(run)
    model = build_model(cfg.model, len(vocab), 1, 1)
    with pytest.raises(RunDirError, match=f"checkpoint {best} cannot be loaded") as e:
        checkpoints.load_weights(model, best)
    assert "\n" not in str(e.value)
    assert cli.main(["sample", "--run-dir", str(run), "-n", "5"]) == 2
    assert str(best) in _one_error_line(capsys.readouterr().err, "sample")


def test_damaged_vocab_is_one_clear_line_for_sample(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "vocab.json").write_bytes(b"\xff\xfe")
    assert cli.main(["sample", "--run-dir", str(run), "-n", "5"]) == 2
    line = _one_error_line(capsys.readouterr().err, "sample")
    assert f"vocabulary file {run / 'vocab.json'} is damaged" in line


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--set", "model.rnn_size=32"], "model.rnn_size: 16 -> 32"),
        (["--set", "model.cell=gru"], "model.cell: 'lstm' -> 'gru'"),
        (["--set", "data.seq_length=4"], "data.seq_length: 8 -> 4"),
        (["--set", "train.ema=0.99"], "train.ema: 0.0 -> 0.99, the optimizer state has no"),
    ],
    ids=["rnn_size", "cell", "seq_length", "ema"],
)
def test_resume_with_other_model_shape_says_what_differs(
    three_epoch_backup, tmp_path, capsys, change, expected
):
    _copy(three_epoch_backup, tmp_path)
    config = (tmp_path / "run" / "config.toml").read_text()
    assert cli.main(_args(tmp_path, "--set", "train.epochs=3", *change)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot resume" in line and expected in line, line
    assert (tmp_path / "run" / "config.toml").read_text() == config, "the run is untouched"


def test_resume_may_change_how_the_lstm_computes_and_how_fresh_weights_are_drawn(
    three_epoch_backup, tmp_path, monkeypatch
):
    _copy(three_epoch_backup, tmp_path)
    change = ["--set", "model.lstm_loop=tensorflow", "--set", "model.init=torch"]
    status, trained = _train_recording(monkeypatch, _args(tmp_path, "--set", "train.epochs=3",
                                                          *change))  # fmt: skip
    assert status == 0 and trained == [2], "resumed at the backed-up epoch, not refused"
    _assert_finished(tmp_path / "run", epochs=3)


def test_resume_with_other_text_or_vocabulary_says_what_differs(three_epoch_backup, tmp_path):
    _copy(three_epoch_backup, tmp_path)
    run = tmp_path / "run"
    other = tmp_path / "other.txt"
    other.write_text(TINY_TEXT.replace("cat", "cow!"))
    cfg = load_config(run / "config.toml")
    with pytest.raises(CharRNNError, match="corpus: .*other.txt is not the text"):
        train_mod.train(cfg, data=str(other), run_dir=run, verbose=0)
    # A run whose run.json predates the corpus digest is compared by vocabulary.
    info = json.loads((run / "run.json").read_text())
    del info["data"]
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(CharRNNError, match=r"vocabulary: 15 -> 17 characters, new '!'"):
        train_mod.train(cfg, data=str(other), run_dir=run, verbose=0)


def test_training_without_validation_finishes(tmp_path, monkeypatch):
    # CSVLogger writes NA in the val_* columns; reading the best loss crashed on them.
    status, trained = _train_recording(monkeypatch, _args(tmp_path, "--set", "data.val_fraction=0"))
    assert status == 0 and trained == [0, 1]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "finished" and info["best_val_loss"] > 0


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, exit status 2, nothing created


def _binary(p: Path) -> None:
    p.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)


def _latin1(p: Path) -> None:
    p.write_bytes(b"plain text, then caf\xe9 " * 40)


def _empty_dir(p: Path) -> None:
    p.mkdir()


def _dir_without_text(p: Path) -> None:
    p.mkdir()
    _binary(p / "a.bin")
    _latin1(p / "b.txt")
    (p / "c.txt").write_text("")


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.write_text(""), "{data} is empty"),
        (_empty_dir, "directory {data} has no files"),
        (_dir_without_text, "directory {data} has no UTF-8 text files"),
        (_binary, "{data} looks binary (a NUL byte at offset 7)"),
        (_latin1, "{data} is not UTF-8: invalid byte 0xe9 at byte offset 20"),
        (lambda p: p.write_text("a" * 5000), "has only one distinct character, 'a' (U+0061)"),
        (lambda p: p.write_text("ab" * 40), "corpus has 80 characters; batch_size=4 x "),
        (lambda p: None, "data path {data} does not exist"),
        (os.mkfifo, "data path {data} is neither a file nor a directory"),
    ],
    ids=[
        "empty",
        "empty-dir",
        "dir-no-text",
        "binary",
        "not-utf8",
        "one-char",
        "too-small",
        "missing",
        "fifo",
    ],  # fmt: skip
)
def test_bad_corpus_is_one_line_and_exit_2(tmp_path, capsys, make, expected):
    data = tmp_path / "corpus"
    make(data)
    argv = _args(tmp_path)
    argv[argv.index("--data") + 1] = str(data)
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert expected.format(data=data) in line, line
    assert not (tmp_path / "run").exists(), "a refused start leaves no run directory"


def test_too_small_corpus_says_what_it_needs(tmp_path, capsys):
    from charrnn_keras.data import min_chars

    argv = _args(tmp_path, text="ab" * 40)
    assert cli.main(argv) == 2
    need = min_chars(4, 8, 0.2)
    assert f"needs at least {need:,}" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "text.txt").write_text("ab" * (need // 2 + 1))  # exactly enough now
    cfg = load_config(TINY_CONFIG, ["train.epochs=1", "train.sample_chars=0"])
    train_mod.train(cfg, data=str(tmp_path / "text.txt"), run_dir=tmp_path / "run", verbose=0)


BAD_SETTINGS = [
    ("train.epochs=0", "train.epochs must be greater than 0, got 0"),
    ("train.epochs=-3", "train.epochs must be greater than 0, got -3"),
    ("data.batch_size=0", "data.batch_size must be greater than 0"),
    ("data.seq_length=-1", "data.seq_length must be greater than 0"),
    ("model.rnn_size=0", "model.rnn_size must be greater than 0"),
    ("model.num_layers=-1", "model.num_layers must be greater than 0"),
    ("train.learning_rate=-0.1", "train.learning_rate must be greater than 0"),
    ("train.learning_rate=inf", "train.learning_rate must be greater than 0"),
    ("train.lr_decay=0", "train.lr_decay must be greater than 0"),
    ("train.grad_clip=-1", "train.grad_clip must be 0 or more"),
    ("train.epsilon=0", "train.epsilon must be greater than 0, got 0.0"),
    ("model.init=xavier", "model.init must be one of keras, torch, got 'xavier'"),
    ("train.weight_decay=-0.1", "train.weight_decay must be 0 or more, got -0.1"),
    ("train.ema=1", "train.ema must be in [0, 1), got 1.0"),
    ("train.max_minutes=-1", "train.max_minutes must be 0 or more"),
    ("model.dropout=-0.5", "model.dropout must be in [0, 1)"),
    ("data.val_fraction=-0.1", "data.val_fraction must be in [0, 1)"),
    ("train.seed=-1", "train.seed must be from 0 to 4294967295, got -1"),
    ("train.epoch=3", "unknown key train.epoch; known keys: train.epochs,"),
]


@pytest.mark.parametrize("setting, expected", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_bad_setting_is_one_line_and_exit_2(tmp_path, capsys, setting, expected):
    assert cli.main(_args(tmp_path, "--set", setting)) == 2
    assert expected in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_config_file_is_one_line_and_exit_2(tmp_path, capsys):
    config = tmp_path / "my.toml"
    config.write_text("[model]\nrnn_size = 16\nhidden = 3\n")
    argv = _args(tmp_path)
    argv[argv.index("--config") + 1] = str(config)
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{config}: unknown key model.hidden; known keys: model.cell," in line


# ---------------------------------------------------------------------------------------------
# Run directories for sample and export


def test_missing_run_dir_or_checkpoint_is_a_clear_error(tmp_path, tiny_run):
    missing = tmp_path / "nope"
    for call in (rundir.load_run, checkpoints.find_checkpoint):
        with pytest.raises(RunDirError, match=f"run directory {missing} does not exist"):
            call(missing)
    empty = tmp_path / "empty"
    shutil.copytree(tiny_run, empty, ignore=shutil.ignore_patterns("checkpoints"))
    rundir.load_run(empty)  # config and vocabulary are fine
    with pytest.raises(RunDirError, match=f"{empty} holds no checkpoint yet"):
        checkpoints.find_checkpoint(empty)
    with pytest.raises(RunDirError, match="checkpoint other.weights.h5 does not exist"):
        checkpoints.find_checkpoint(tiny_run, "other.weights.h5")


@pytest.mark.parametrize("command", ["sample", "export"])
def test_cli_missing_run_dir_or_checkpoint_is_one_line(tmp_path, tiny_run, capsys, command):
    extra = ["--export-dir", str(tmp_path / "export")] if command == "export" else ["-n", "5"]
    missing = tmp_path / "nope"
    assert cli.main([command, "--run-dir", str(missing), *extra]) == 2
    assert str(missing) in _one_error_line(capsys.readouterr().err, command)
    empty = tmp_path / "empty"
    shutil.copytree(tiny_run, empty, ignore=shutil.ignore_patterns("checkpoints"))
    assert cli.main([command, "--run-dir", str(empty), *extra]) == 2
    assert "holds no checkpoint" in _one_error_line(capsys.readouterr().err, command)


def test_only_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid, live_pid = int(dead.stdout), os.getppid()
    names = {
        f".best.tmp{dead_pid}.weights.h5": False,  # CharRNN.save_weights, killed
        f"..latest.tmp{dead_pid}.tmp{dead_pid}.weights.h5": False,  # the same inside a backup
        f".training_metadata.json.tmp{dead_pid}": False,  # RunBackup's metadata
        f".best.tmp{os.getpid()}.weights.h5": False,  # an earlier process with our id
        f".best.tmp{live_pid}.weights.h5": True,  # a process still writing it
        "best.weights.h5": True,
        f"i10_l16_v2.000.weights.h5.tmp{dead_pid}": True,  # not a name we write
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = atomic.remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, kept in names.items() if not kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, k in names.items() if k)
    assert atomic.remove_stale(tmp_path / "missing") == []


# ---------------------------------------------------------------------------------------------
# --overwrite replaces only a run of ours, and only once the new one is ready


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


def test_overwrite_with_a_bad_corpus_keeps_the_finished_run(tiny_run, tmp_path, capsys):
    # `--overwrite --data typo.txt` deleted the finished run before reading the corpus.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = _snapshot(run)
    argv = _args(tmp_path, "--overwrite")
    argv[argv.index("--data") + 1] = str(tmp_path / "typo.txt")
    assert cli.main(argv) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(run) == before, "the old run is untouched"


def test_overwrite_that_fails_while_setting_up_keeps_the_old_run(tiny_run, tmp_path, monkeypatch):
    from charrnn_keras.errors import StorageError
    from charrnn_keras.vocab import Vocab

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = _snapshot(run)
    save = Vocab.save

    def full_disk(self, path):
        if Path(path).name == "vocab.json":
            raise StorageError(f"cannot write {path}: the disk is full")
        return save(self, path)

    monkeypatch.setattr(Vocab, "save", full_disk)
    assert cli.main(_args(tmp_path, "--overwrite")) == 1
    assert _snapshot(run) == before, "the old run is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", "run", "text.txt"]

    monkeypatch.setattr(Vocab, "save", save)
    status, trained = _train_recording(monkeypatch, _args(tmp_path, "--overwrite"))
    assert status == 0 and trained == [0, 1], "a new run from epoch 1"
    _assert_finished(run)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", "run", "text.txt"]


@pytest.mark.parametrize("corpus_inside", [True, False], ids=["holds-corpus", "other-files"])
def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, capsys, corpus_inside):
    # `--overwrite` deleted whatever directory --run-dir named (a home directory, the corpus').
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    argv = _args(tmp_path, "--overwrite")
    if corpus_inside:
        (folder / "text.txt").write_text(TINY_TEXT)
        argv[argv.index("--data") + 1] = str(folder / "text.txt")
    before = _snapshot(folder)
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{folder} exists and is not a run directory" in line, line
    assert "--overwrite only replaces run directories" in line, line
    assert _snapshot(folder) == before


def test_overwrite_refuses_a_run_directory_holding_the_corpus(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "corpus").mkdir()
    (run / "corpus" / "text.txt").write_text(TINY_TEXT)
    before = _snapshot(run)
    argv = _args(tmp_path, "--overwrite")
    argv[argv.index("--data") + 1] = str(run / "corpus")
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{run} holds the corpus {run / 'corpus'}; --overwrite would delete it" in line, line
    assert _snapshot(run) == before


# ---------------------------------------------------------------------------------------------
# One process per run directory; a resume leaves no trace of the steps it trains again


def test_second_train_on_a_run_in_use_is_refused_naming_the_pid(
    three_epoch_backup, tmp_path, capsys
):
    _copy(three_epoch_backup, tmp_path)
    run = tmp_path / "run"
    before = _snapshot(run)
    with rundir.RunDir(run).lock():  # what a running `charrnn train` holds
        assert cli.main(_args(tmp_path, "--set", "train.epochs=3")) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"{run} is in use by another charrnn train (pid {os.getpid()})" in line, line
        after = _snapshot(run)
    assert after == before, "the refused process changed nothing"


def test_resume_removes_periodic_checkpoints_of_steps_trained_again(
    three_epoch_backup, tmp_path, monkeypatch
):
    # Checkpoints saved after the backup (in the epoch a kill cut short) kept their names and
    # the resumed run's later ones sat beside them, the latest step no longer the newest file.
    _copy(three_epoch_backup, tmp_path)
    ckpt = tmp_path / "run" / "checkpoints"
    kept, stale = ckpt / "i1_l16_v2.000.weights.h5", ckpt / "i1000000_l16_vnan.weights.h5"
    shutil.copyfile(ckpt / "best.weights.h5", kept)
    shutil.copyfile(ckpt / "best.weights.h5", stale)
    status, trained = _train_recording(monkeypatch, _args(tmp_path, "--set", "train.epochs=3"))
    assert status == 0 and trained == [2]
    assert kept.exists() and not stale.exists()


def test_backup_must_be_restored_before_fit(tmp_path):
    # On Keras' public API the resume point reaches fit only as initial_epoch: a backup not
    # restored first would let fit start at epoch 0 over a backup of later epochs.
    from charrnn_keras.backup import RunBackup

    with pytest.raises(ValueError, match="backup_dir must name a directory, received: ''"):
        RunBackup("")
    cfg = load_config(TINY_CONFIG)
    model = build_model(cfg.model, 12, 2, 4)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = keras.ops.zeros((2, 4), dtype="int32")
    with pytest.raises(RuntimeError, match="call RunBackup.restore"):
        model.fit(x, x, batch_size=2, epochs=1, verbose=0, callbacks=[RunBackup(tmp_path / "b")])
    backup = RunBackup(tmp_path / "b")
    backup.set_model(model)
    assert backup.restore() == 0
    model.fit(x, x, batch_size=2, epochs=1, verbose=0, callbacks=[backup])
    assert backup.saved_epoch == 1
    assert json.loads((tmp_path / "b" / "training_metadata.json").read_text()) == {
        "epoch": 1,
        "replicas": 1,
    }
