"""The charrnn command as a user runs it, in a subprocess: what it writes is all it writes.

A refusal is exactly one line on stderr, whatever TensorFlow would print while it loads, and a
training run piped to a file writes plain lines. Each subprocess that reaches TensorFlow takes
seconds, so each case here is one a user meets.
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_CONFIG, TINY_TEXT

from charrnn_keras import cli
from charrnn_keras.rundir import newest_run, next_in_series


def charrnn(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # A developer's own TensorFlow log settings would (rightly) bring its start-up lines back.
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_CPP_MAX_VLOG_LEVEL", "TF_CPP_VMODULE"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "charrnn_keras.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_error_line(proc: subprocess.CompletedProcess, prefix: str, *fragments: str):
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    line = proc.stderr.removesuffix("\n")
    assert proc.stderr == line + "\n" and "\n" not in line, proc.stderr  # the whole of stderr
    assert line.startswith(prefix + ": error: "), line
    for fragment in fragments:
        assert fragment in line


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "args, prefix, fragments",
    [
        (["sample", "--bogus"], "charrnn", ["unrecognized arguments: --bogus", "--help"]),
        ([], "charrnn", ["required: command"]),
        (["sample", "-n", "many"], "charrnn sample", ["--num-chars", "'many'"]),
        (
            ["serve", "--tensorflow_intra_op_parallelism", "-1"],
            "charrnn serve",
            ["--tensorflow_intra_op_parallelism", "-1"],
        ),  # fmt: skip
    ],
    ids=["unknown-flag", "missing-command", "bad-int", "negative-threads"],
)
def test_usage_error_is_one_line(tmp_path, args, prefix, fragments):
    assert_one_error_line(charrnn(*args, cwd=tmp_path), prefix, *fragments)


def test_help_is_still_the_full_usage(tmp_path):
    proc = charrnn("sample", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: charrnn sample") and "--temperature" in proc.stdout


# These reach TensorFlow: its start-up lines would come before the error.
@pytest.mark.parametrize(
    "args, prefix, fragments",
    [
        (["train", "--data", "missing.txt"], "charrnn train", ["missing.txt"]),
        (["train", "--data", "{text}", "--set", "model.foo=1"], "charrnn train", ["model.foo"]),
        (["train", "--data", "{text}", "--set", "train.epochs=0"], "charrnn train", ["epochs"]),
        (["sample", "-n", "5"], "charrnn sample", [str(Path("runs", "default"))]),
        (["export", "--run-dir", "nope"], "charrnn export", ["nope"]),
    ],
    ids=["missing-data", "unknown-key", "bad-value", "sample-no-run", "export-missing-run"],
)
def test_bad_input_is_one_line_without_tensorflow_noise(tmp_path, text, args, prefix, fragments):
    args = [arg.format(text=text) for arg in args]
    assert_one_error_line(charrnn(*args, cwd=tmp_path), prefix, *fragments)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "export").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`charrnn train` on a tiny config, stdout piped: (working directory, finished process)."""
    cwd = tmp_path_factory.mktemp("cli")
    (cwd / "text.txt").write_text(TINY_TEXT, encoding="utf-8")
    proc = charrnn(
        "train",
        "--config",
        TINY_CONFIG,
        "--data",
        "text.txt",
        "--set",
        "train.epochs=1",
        "--set",
        "train.sample_chars=0",
        cwd=cwd,
    )
    return cwd, proc


@pytest.mark.slow
def test_piped_training_writes_plain_lines_and_no_tensorflow_noise(trained):
    cwd, proc = trained
    assert proc.returncode == 0, proc.stderr
    # With no samples asked for, stderr is only our own log lines.
    assert proc.stderr and all(
        line.startswith("INFO charrnn_keras.") for line in proc.stderr.splitlines()
    ), proc.stderr
    assert not re.search(r"[\x1b\r\b]", proc.stdout), repr(proc.stdout)
    lines = proc.stdout.splitlines()
    assert any(re.match(r"\d+/\d+ - \d+s - .*loss: ", line) for line in lines), lines  # verbose=2
    assert f"run directory: {Path('runs', 'tiny')}" in lines
    assert (cwd / "runs" / "tiny" / "checkpoints" / "best.weights.h5").is_file()


@pytest.mark.slow
def test_sample_uses_the_newest_run_of_its_config(trained):
    cwd, _ = trained
    proc = charrnn("sample", "--config", TINY_CONFIG, "-n", "5", "--prime", "the ", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("the ") and len(proc.stdout) == len("the ") + 5 + 1


@pytest.mark.slow
def test_bad_temperature_is_one_line(trained):
    cwd, _ = trained
    proc = charrnn("sample", "--config", TINY_CONFIG, "--temperature", "-1", cwd=cwd)
    assert_one_error_line(proc, "charrnn sample", "temperature", "-1")


def test_newest_run_follows_train_naming(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert newest_run("tiny") == Path("runs", "tiny")  # none yet: named
    for name in ["tiny", "tiny-2", "tiny-10", "tiny-x", "tiny-1", "tinyish-50", "other-99"]:
        (tmp_path / "runs" / name).mkdir(parents=True)
    assert newest_run("tiny") == Path("runs", "tiny-10")
    assert newest_run("default") == Path("runs", "default")
    assert next_in_series("tiny") == Path("runs", "tiny-11")
    assert next_in_series("other") == Path("runs", "other-100")
    assert next_in_series("new") == Path("runs", "new")


# One case for each row of README.md's bad-input and crash tables whose refusal a user sees
# on the command line: the whole of stderr is that one line, TensorFlow loaded or not.
# (id, setup(tmp) -> argv, exit status, words the line holds)
def _damaged(tmp, tiny_run, name, content=b"\xff\xfe"):
    run = tmp / "run"
    shutil.copytree(tiny_run, run)
    (run / name).write_bytes(content)
    return run


README_ROWS = [
    ("empty-corpus", lambda tmp, run: ["train", "--data", _file(tmp, "e.txt", b""), "--run-dir", tmp / "r"], 2, "is empty"),  # noqa: E501
    ("binary-corpus", lambda tmp, run: ["train", "--data", _file(tmp, "b.txt", b"ab\x00cd"), "--run-dir", tmp / "r"], 2, "looks binary"),  # noqa: E501
    ("corpus-too-small", lambda tmp, run: ["train", "--config", TINY_CONFIG, "--data", _file(tmp, "s.txt", b"abcab"), "--run-dir", tmp / "r"], 2, "needs at least"),  # noqa: E501
    ("bad-setting", lambda tmp, run: ["train", "--set", "train.epochs=0"], 2, "train.epochs must be greater than 0"),  # noqa: E501
    ("unknown-key-in-file", lambda tmp, run: ["train", "--config", _file(tmp, "c.toml", b"[model]\nsize = 3\n")], 2, "unknown key model.size"),  # noqa: E501
    ("model-too-large", lambda tmp, run: ["train", "--config", TINY_CONFIG, "--data", _file(tmp, "t.txt", TINY_TEXT.encode()), "--run-dir", tmp / "r", "--set", "model.rnn_size=1000000"], 2, "model.rnn_size"),  # noqa: E501
    ("overwrite-not-a-run", lambda tmp, run: ["train", "--data", _file(tmp, "d/c.txt", TINY_TEXT.encode()), "--run-dir", tmp / "d", "--overwrite"], 2, "is not a run directory"),  # noqa: E501
    ("sample-missing-run", lambda tmp, run: ["sample", "--run-dir", tmp / "nope"], 2, "does not exist"),  # noqa: E501
    ("sample-unknown-prime", lambda tmp, run: ["sample", "--run-dir", run, "-p", "th\u00e9"], 2, "U+00E9"),  # noqa: E501
    ("sample-top-k-over-vocab", lambda tmp, run: ["sample", "--run-dir", run, "--top-k", "999"], 2, "top_k must be from 0"),  # noqa: E501
    ("damaged-vocab", lambda tmp, run: ["sample", "--run-dir", _damaged(tmp, run, "vocab.json")], 2, "is damaged"),  # noqa: E501
    ("damaged-checkpoint", lambda tmp, run: ["sample", "--run-dir", _damaged(tmp, run, "checkpoints/best.weights.h5")], 2, "cannot be loaded"),  # noqa: E501
    ("export-missing-run", lambda tmp, run: ["export", "--run-dir", tmp / "nope", "--export-dir", tmp / "e"], 2, "does not exist"),  # noqa: E501
    ("export-max-chars-over-int32", lambda tmp, run: ["export", "--run-dir", run, "--max-chars", "3000000000"], 2, "(int32)"),  # noqa: E501
    ("serve-no-export", lambda tmp, run: ["serve", "--export-dir", tmp / "nope", "--port", "0"], 2, "does not exist"),  # noqa: E501
    ("query-no-server", lambda tmp, run: ["query", "--server", "127.0.0.1:1", "-n", "5", "--timeout", "5"], 2, "cannot reach"),  # noqa: E501
]  # fmt: skip


def _file(tmp: Path, name: str, content: bytes) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "setup, status, words", [r[1:] for r in README_ROWS], ids=[r[0] for r in README_ROWS]
)
def test_readme_refusals_are_the_whole_stderr(tmp_path, tiny_run, setup, status, words):
    argv = setup(tmp_path, tiny_run)
    proc = charrnn(*argv, cwd=tmp_path)
    assert proc.returncode == status, proc.stderr
    line = proc.stderr.removesuffix("\n")
    assert proc.stderr == line + "\n" and "\n" not in line, proc.stderr  # the whole of stderr
    assert line.startswith(f"charrnn {argv[0]}: error: ") and words in line, line


def test_collector_paused_for_the_imports_only_when_main_is_the_command(tmp_path, monkeypatch):
    """The console script's main() loads TensorFlow with the GC off, then freezes and turns it
    back on; main(argv) called by a program leaves that program's collector alone."""
    seen = []
    checked_run = cli._checked_run

    def recording(args):
        seen.append(gc.isenabled())
        return checked_run(args)

    monkeypatch.setattr(cli, "_checked_run", recording)
    missing = ["sample", "--run-dir", str(tmp_path / "missing")]
    frozen = gc.get_freeze_count()
    assert cli.main(missing) == 2
    assert seen == [True] and gc.isenabled() and gc.get_freeze_count() == frozen

    monkeypatch.setattr(sys, "argv", ["charrnn", *missing])
    try:
        assert cli.main() == 2  # refused before its imports: the collector is back on anyway
        assert seen == [True, False] and gc.isenabled()
    finally:
        gc.unfreeze()
