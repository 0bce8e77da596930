"""Training under tf.distribute: the same numbers as one device, each replica its own streams and
state, and two `charrnn train` workers on loopback that resume after one of them is killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_CONFIG, TINY_TEXT

from charrnn_keras import data as data_lib
from charrnn_keras.config import load_config
from charrnn_keras.errors import BackupError, ConfigError


def _env(**extra) -> dict:
    env = dict(os.environ)
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_CPP_MAX_VLOG_LEVEL", "TF_CPP_VMODULE", "TF_CONFIG"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def test_replicas_get_fixed_disjoint_rows():
    ids = np.arange(1000, dtype=np.int32)
    xs, _ = data_lib.stream_batches(ids, 4, 5)
    ds, steps = data_lib.make_dataset(ids, 4, 5, replicas=2, local=[1, 0])
    got = [x.numpy() for x, _ in ds]
    assert len(got) == 2 * steps
    for s in range(steps):  # each step: replica 1's rows, then replica 0's
        np.testing.assert_array_equal(got[2 * s], xs[s, 2:4])
        np.testing.assert_array_equal(got[2 * s + 1], xs[s, 0:2])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ('train.distribute="ring"', "train.distribute must be one of none, mirrored"),
        ("train.replicas=2", 'train.replicas = 2 needs train.distribute = "mirrored"'),
        ("train.replicas=-1", "train.replicas must be 0 or more"),
    ],
)
def test_bad_distribute_settings(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(TINY_CONFIG, [override])


def test_backup_from_another_replica_count_is_refused(tmp_path):
    from charrnn_keras.backup import RunBackup
    from charrnn_keras.model import build_model, compile_model

    cfg = load_config(TINY_CONFIG)
    model = build_model(cfg.model, 10, 4, 8)
    compile_model(model, cfg.train)
    saved = RunBackup(tmp_path / "backup", replicas=2)
    saved.set_model(model)
    saved._restored = True
    saved.on_epoch_begin(0)
    saved.on_epoch_end(0, {"loss": 1.0})
    assert json.loads((tmp_path / "backup" / "training_metadata.json").read_text()) == {
        "epoch": 1,
        "replicas": 2,
    }
    again = RunBackup(tmp_path / "backup", replicas=1)
    again.set_model(model)
    with pytest.raises(BackupError, match="made on 2 replicas and this run has 1"):
        again.restore()
    same = RunBackup(tmp_path / "backup", replicas=2)
    same.set_model(model)
    assert same.restore() == 1


def test_a_worker_names_the_epoch_of_the_chiefs_backup(tmp_path):
    """A non-chief's stop line names the epoch the rerun resumes from: the chief's backup's,
    which is an epoch ahead of the worker's own when the chief stopped at an epoch end."""
    from charrnn_keras.backup import RunBackup
    from charrnn_keras.model import build_model, compile_model

    cfg = load_config(TINY_CONFIG)
    model = build_model(cfg.model, 10, 4, 8)
    compile_model(model, cfg.train)
    chief = tmp_path / "chief"
    worker = RunBackup(tmp_path / "worker", replicas=2, restore_from=chief)
    worker.set_model(model)
    assert worker.restore() == 0 and worker.resumable_epoch() == 0
    worker.on_epoch_begin(0)
    worker.on_epoch_end(0, {"loss": 1.0})
    chief.mkdir()
    (chief / "training_metadata.json").write_text('{"epoch": 2, "replicas": 2}')
    assert worker.saved_epoch == 1 and worker.resumable_epoch() == 2


def test_mirrored_on_two_cpu_devices_matches_one_device(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT * 2, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "distribute_check.py"), str(corpus), str(tmp_path)],
        env=_env(TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["rows_ok"]  # replica k: rows [2k, 2k + 2) of every batch, epoch after epoch
    assert r["replica_states_differ"]  # two replicas, two states
    assert r["state_max_diff"] < 1e-5  # ...which are the one device's rows of its state
    assert r["validation_keeps_state"] and r["validation_loss_finite"]
    # Keras' own LSTM and FastLSTM's bf16 matmuls train under the strategy as on one device
    # (bf16 rounds, so to its precision); and the steps did learn something.
    assert r["keras_lstm_loss_max_diff"] < 1e-5 and r["keras_lstm_loss_moved"] > 1e-2
    assert r["bf16_loss_max_diff"] < 1e-3 and r["bf16_loss_moved"] > 1e-2
    assert r["steps"] >= 20
    assert r["loss_max_diff"] < 1e-5  # the same loss at every step (gradient clipping on)
    assert r["history_rows"] == [4, 4] and r["history_max_diff"] < 1e-5
    # With a moving average of the weights and weight decay: validation of the average and
    # the best checkpoint (the average) as on one device, to the rounding of three epochs of
    # gradients summed across replicas in another order.
    assert r["ema_history_max_diff"] < 1e-5 and r["ema_best_max_diff"] < 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers(tmp_path: Path, run_dir: Path, *extra_per_worker) -> list[subprocess.Popen]:
    """Starts one `charrnn train --distribute multi_worker` per entry, on loopback."""
    hosts = [f"127.0.0.1:{_free_port()}" for _ in extra_per_worker]
    procs = []
    for index, extra in enumerate(extra_per_worker):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "charrnn_keras.cli",
                    "train",
                    "--config",
                    str(TINY_CONFIG),
                    "--data",
                    str(tmp_path / "corpus.txt"),
                    "--run-dir",
                    str(run_dir),
                    "--distribute",
                    "multi_worker",
                    "--quiet",
                    "--set",
                    "train.sample_chars=20",
                    *extra,
                ],  # fmt: skip
                env=_env(TF_CONFIG=json.dumps(tf_config)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=tmp_path,
            )
        )
    return procs


def _finish(procs, timeout=400):
    return [(p.wait(timeout), *p.communicate()) for p in procs]


def _errors(stderr: str) -> list[str]:
    """The lines of a worker's stderr that are not its progress log (INFO lines and samples):
    our one-line error, or anything TensorFlow or Python wrote."""
    lines = stderr.splitlines()
    noise = [x for x in lines if x.startswith(("E0000", "W0000", "I0000", "Traceback", "  File"))]
    return noise + [x for x in lines if x.startswith("charrnn")]


def _cli(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "charrnn_keras.cli", *map(str, args)],
        env=_env(), capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip


def test_two_workers_train_survive_a_kill_and_resume(tmp_path):
    # Long enough epochs (about 80 steps, a second or two) that the kill lands inside one.
    (tmp_path / "corpus.txt").write_text(TINY_TEXT * 15, encoding="utf-8")
    run = tmp_path / "run"
    epochs = ["--set", "train.epochs=3", "--set", "data.batch_size=16"]
    procs = _workers(tmp_path, run, epochs, epochs)
    history = run / "history.csv"
    deadline = time.monotonic() + 300
    while not (history.exists() and len(history.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)  # worker 1 dies in epoch 2
    (code0, out0, err0), (code1, _, _) = _finish(procs)
    assert code1 == -signal.SIGKILL
    assert code0 == 1, err0  # two epochs of about 80 steps were left when worker 1 died
    lines = _errors(err0)
    assert len(lines) == 1 and err0.splitlines()[-1] == lines[0], err0  # nothing else
    assert lines[0].startswith("charrnn train: error: worker 0: training stopped in epoch ")
    assert "run the same command on every worker to resume" in lines[0]
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"

    results = _finish(_workers(tmp_path, run, epochs, epochs))
    for code, out, err in results:
        assert code == 0, err
        assert _errors(err) == [], err
        assert f"run directory: {run}" in out
    assert "sample:" in results[0][1] and "sample:" not in results[1][1]  # the chief's alone
    rows = history.read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]  # each epoch once
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["compute"]["replicas"] == 2
    assert not list(tmp_path.glob("charrnn-worker*"))  # the other worker's scratch is gone

    # The run directory is a run like any other (in this process: two start-ups less).
    from charrnn_keras.export import export_run
    from charrnn_keras.sampling import Sampler

    assert len("".join(Sampler.from_run_dir(run).generate("the", 30, seed=3))) == 30
    assert (export_run(run, tmp_path / "export", "charrnn") / "saved_model.pb").exists()


def test_workers_that_disagree_stop_before_training(tmp_path):
    (tmp_path / "corpus.txt").write_text(TINY_TEXT, encoding="utf-8")
    run = tmp_path / "run"
    results = _finish(_workers(tmp_path, run, ["--set", "train.epochs=2"],
                               ["--set", "train.epochs=3"]))  # fmt: skip
    for code, out, err in results:
        assert code == 1 and out == "", err
        lines = _errors(err)
        assert len(lines) == 1, err
        assert "the workers disagree on train.epochs" in lines[0]
    assert not (run / "history.csv").exists()


def test_multi_worker_needs_tf_config(tmp_path):
    (tmp_path / "corpus.txt").write_text(TINY_TEXT, encoding="utf-8")
    proc = _cli(tmp_path, "train", "--config", TINY_CONFIG, "--data", tmp_path / "corpus.txt",
                "--run-dir", tmp_path / "run", "--distribute", "multi_worker")  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "needs the cluster in TF_CONFIG on every worker" in proc.stderr
    assert not (tmp_path / "run").exists()
