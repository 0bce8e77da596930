import csv
import math
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import TINY_CONFIG, TINY_TEXT

from charrnn_keras.callbacks import ResetStates
from charrnn_keras.config import load_config
from charrnn_keras.errors import CharRNNError
from charrnn_keras.model import build_model, compile_model, rnn_layers
from charrnn_keras.vocab import Vocab


def _cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "charrnn_keras.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
        **kwargs,
    )


def _history(run_dir):
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _tiny_model(batch=2, seq=4, vocab=12):
    cfg = load_config(TINY_CONFIG)
    keras.utils.set_random_seed(0)
    model = build_model(cfg.model, vocab, batch, seq)
    compile_model(model, cfg.train)
    return cfg, model


def test_initial_loss_is_close_to_uniform():
    cfg, model = _tiny_model(batch=4, seq=8, vocab=30)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 30, (4, 8)).astype("int32")
    y = rng.integers(0, 30, (4, 8)).astype("int32")
    loss = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)["loss"]
    assert abs(loss - math.log(30)) < 0.1


def test_layers_are_distinct_and_named():
    cfg, model = _tiny_model()
    names = [layer.name for layer in model.layers]
    assert names == ["embedding", "lstm_1", "lstm_2", "logits"]
    cells = [layer.cell for layer in rnn_layers(model)]
    assert cells[0] is not cells[1]
    assert all(layer.stateful for layer in rnn_layers(model))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_torch_init_draws_as_pytorch_does(cell):
    cfg = load_config(TINY_CONFIG, [f"model.cell={cell}", "model.init=torch", "model.rnn_size=32"])
    keras.utils.set_random_seed(0)
    model = build_model(cfg.model, 12, 2, 4)
    bound = 1 / math.sqrt(32)
    values = []
    for layer in rnn_layers(model):
        for var in (layer.cell.kernel, layer.cell.recurrent_kernel):
            values.append(var.numpy().ravel())
            assert np.abs(var.numpy()).max() <= bound
            assert np.abs(var.numpy()).max() > 0.9 * bound  # uniform over the whole range
        bias = layer.cell.bias.numpy().ravel()  # b_ih + b_hh: two draws, no forget bias of 1
        assert np.abs(bias).max() <= 2 * bound and np.abs(bias).max() > bound
    # every variable its own draw (one shared initialiser would repeat its values)
    assert len({v[:8].tobytes() for v in values}) == len(values)
    logits = model.get_layer("logits")
    assert np.abs(logits.kernel.numpy()).max() <= bound and np.abs(logits.bias.numpy()).max() > 0


def test_keras_init_keeps_the_forget_gate_bias_of_one():
    cfg, model = _tiny_model()
    units = cfg.model.rnn_size
    for layer in rnn_layers(model):
        bias = layer.cell.bias.numpy()
        np.testing.assert_array_equal(bias[units : 2 * units], 1.0)
        np.testing.assert_array_equal(np.delete(bias, np.s_[units : 2 * units]), 0.0)


def test_sum_of_uniforms_rejects_bad_arguments():
    from charrnn_keras.initializers import SumOfUniforms

    with pytest.raises(ValueError, match="bound=0"):
        SumOfUniforms(0)
    with pytest.raises(ValueError, match="count=0"):
        SumOfUniforms(0.1, count=0)


def test_state_is_carried_across_batches():
    cfg, stateful = _tiny_model(batch=2, seq=4)
    whole = build_model(cfg.model, 12, 2, 8)
    whole.set_weights(stateful.get_weights())
    x = np.random.default_rng(1).integers(0, 12, (2, 8)).astype("int32")
    first = stateful(x[:, :4], training=False)
    second = stateful(x[:, 4:], training=False)
    expected = whole(x, training=False).numpy()
    np.testing.assert_allclose(first, expected[:, :4], atol=1e-5)
    np.testing.assert_allclose(second, expected[:, 4:], atol=1e-5)


class _StateProbe(keras.callbacks.Callback):
    """Records the state norm when each training and validation batch begins."""

    def __init__(self):
        super().__init__()
        self.train, self.test = [], []

    def _norm(self):
        return sum(float(np.abs(np.array(v)).sum()) for lyr in rnn_layers(self.model)
                   for v in lyr.states)  # fmt: skip

    def on_train_batch_begin(self, batch, logs=None):
        self.train.append((batch, self._norm()))

    def on_test_batch_begin(self, batch, logs=None):
        self.test.append((batch, self._norm()))


def test_state_resets_at_epoch_start_and_around_validation():
    cfg, model = _tiny_model(batch=2, seq=4)
    x = np.random.default_rng(2).integers(0, 12, (3, 2, 4)).astype("int32")
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, x))
    probe = _StateProbe()
    model.fit(
        ds, validation_data=ds, epochs=2, callbacks=[ResetStates(), probe], verbose=0, shuffle=False
    )
    starts = [norm for batch, norm in probe.train if batch == 0]
    carried = [norm for batch, norm in probe.train if batch > 0]
    assert starts == [0.0, 0.0]  # each epoch starts from zero state
    assert all(norm > 0 for norm in carried)  # within an epoch the state carries on
    val_starts = [norm for batch, norm in probe.test if batch == 0]
    assert val_starts == [0.0, 0.0]  # validation never inherits the training state


def test_tiny_model_learns_repetitive_text(tiny_run):
    rows = _history(tiny_run)
    assert len(rows) == 3
    vocab = Vocab.load(tiny_run / "vocab.json")
    first, last = float(rows[0]["loss"]), float(rows[-1]["val_loss"])
    assert last < math.log(len(vocab)) - 0.8, rows
    assert float(rows[-1]["loss"]) < first - 0.3, rows
    assert float(rows[-1]["bpc"]) == pytest.approx(float(rows[-1]["loss"]) / math.log(2), rel=1e-3)


def test_learning_rate_decays_per_epoch(tiny_run):
    lrs = [float(r["learning_rate"]) for r in _history(tiny_run)]
    cfg = load_config(TINY_CONFIG)
    expected = [cfg.train.learning_rate * cfg.train.lr_decay**e for e in range(3)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-5)


def test_run_directory_describes_itself(tiny_run):
    import json

    from charrnn_keras.rundir import load_run

    for name in [
        "config.toml",
        "vocab.json",
        "run.json",
        "history.csv",
        "checkpoints/best.weights.h5",
    ]:
        assert (tiny_run / name).exists(), name
    assert list((tiny_run / "logs").rglob("events.out.tfevents*"))
    assert not (tiny_run / "backup").exists()  # finished runs drop their backup
    info = json.loads((tiny_run / "run.json").read_text())
    assert info["status"] == "finished" and info["epochs_done"] == 3
    cfg, vocab = load_run(tiny_run)
    assert cfg.model.rnn_size == 16
    assert "".join(vocab.chars) == "".join(sorted(set(TINY_TEXT)))


def test_periodic_checkpoints_are_named_with_step_and_val_loss(tmp_path, tiny_text_file):
    from charrnn_keras.train import train

    cfg = load_config(TINY_CONFIG, ["train.checkpoint_every=10", "train.sample_chars=0"])
    result = train(cfg, data=str(tiny_text_file), run_dir=tmp_path / "run", verbose=0)
    names = sorted(p.name for p in (result.run_dir / "checkpoints").glob("i*.weights.h5"))
    assert names, "no periodic checkpoints"
    for name in names:
        step, units, val = name.removesuffix(".weights.h5").split("_")
        assert int(step[1:]) % 10 == 0 and units == "l16" and float(val[1:]) > 0


def test_finished_run_is_never_overwritten(tiny_run):
    from charrnn_keras.resume import resolve_run_dir

    with pytest.raises(CharRNNError, match="finished run; pass overwrite=True"):
        resolve_run_dir(tiny_run, "tiny", overwrite=False)


def test_default_run_dirs_are_numbered(tmp_path, monkeypatch, tiny_run):
    import shutil

    from charrnn_keras.resume import resolve_run_dir

    monkeypatch.chdir(tmp_path)
    assert resolve_run_dir(None, "tiny", False) == tmp_path.joinpath("runs/tiny").relative_to(
        tmp_path
    )
    shutil.copytree(tiny_run, "runs/tiny")
    assert str(resolve_run_dir(None, "tiny", False)) == "runs/tiny-2"


@pytest.mark.slow
def test_cli_train_end_to_end(tmp_path, tiny_text_file):
    run = tmp_path / "run"
    args = ["train", "--config", str(TINY_CONFIG), "--data", str(tiny_text_file),
            "--run-dir", str(run), "--quiet"]  # fmt: skip
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    assert f"run directory: {run}" in done.stdout
    assert "best validation loss:" in done.stdout and "bits/char" in done.stdout
    assert "sample:" in done.stdout
    again = _cli(*args)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("charrnn train: error:")
    assert "--overwrite" in again.stderr
    assert _cli(*args, "--overwrite").returncode == 0


def test_cli_rejects_unknown_set_key(tmp_path, tiny_text_file):
    done = _cli("train", "--config", str(TINY_CONFIG), "--data", str(tiny_text_file),
                "--run-dir", str(tmp_path / "r"), "--set", "train.epoch=3")  # fmt: skip
    assert done.returncode == 2
    assert "unknown key train.epoch" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_interrupted_run_resumes_at_the_right_epoch(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TINY_TEXT * 4)
    run = tmp_path / "run"
    args = ["train", "--config", str(TINY_CONFIG), "--data", str(text), "--run-dir", str(run),
            "--set", "train.epochs=40", "--set", "train.sample_chars=0"]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "charrnn_keras.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    meta = run / "backup" / "training_metadata.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (meta.exists() and len(_history(run)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Run the same command again to resume" in err
    done_epochs = len(_history(run))
    assert 2 <= done_epochs < 40

    resumed = _cli(*args, "--set", "train.epochs=" + str(done_epochs + 2), env=env)
    assert resumed.returncode == 0, resumed.stderr
    # Keras numbers epochs from 1: the first epoch trained again is the one after the backup.
    assert f"Epoch {done_epochs + 1}/{done_epochs + 2}" in resumed.stdout
    assert "Epoch 1/" not in resumed.stdout
    epochs = [int(r["epoch"]) for r in _history(run)]
    assert epochs == list(range(done_epochs + 2))


def test_periodic_checkpoint_names_are_parsed_back_even_for_non_finite_losses(tmp_path):
    # The name was written with f"{loss:.3f}" ("nan", "inf") but parsed with [\d.]+: a
    # checkpoint saved at a NaN loss was invisible to find_checkpoint.
    from charrnn_keras import checkpoints

    losses = {5: 1.5, 10: math.nan, 20: math.inf, 30: -math.inf}
    names = [checkpoints.checkpoint_name(step, 16, loss) for step, loss in losses.items()]
    assert names[1] == "i10_l16_vnan.weights.h5" and names[2] == "i20_l16_vinf.weights.h5"
    assert [checkpoints.checkpoint_step(n) for n in names] == list(losses)
    assert checkpoints.checkpoint_step("best.weights.h5") is None
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for name in reversed(names):
        (ckpt / name).write_bytes(b"x")
    assert [p.name for p in checkpoints.periodic_checkpoints(tmp_path)] == names
    assert checkpoints.find_checkpoint(tmp_path).name == names[-1]


class _Clock:
    """Stands in for the clock TimeBudget reads; a callback moves it on, so no test waits."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now


class _SpendBudget(keras.callbacks.Callback):
    """Moves the clock past the budget after the second step of epoch ``at``."""

    def __init__(self, clock, at, minutes):
        super().__init__()
        self.clock, self.at, self.minutes = clock, at, minutes

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._epoch == self.at and batch == 1:
            self.clock.now += self.minutes * 60 + 1


def _tensorboard_steps(run_dir, tag="epoch_loss"):
    import tensorflow as tf

    steps = []
    for path in sorted((run_dir / "logs" / "train").glob("events.out.tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)


def test_time_budget_stop_is_resumable_and_records_whole_epochs_only(
    tmp_path, tiny_text_file, monkeypatch
):
    # A spent train.max_minutes marked the run finished and deleted its backup, and the epoch
    # it cut short was recorded as a whole one in history.csv, run.json and TensorBoard.
    import json

    from charrnn_keras import callbacks
    from charrnn_keras.train import train

    clock = _Clock()
    monkeypatch.setattr(callbacks, "time", clock)
    run = tmp_path / "run"
    cfg = load_config(TINY_CONFIG, ["train.epochs=3", "train.max_minutes=1",
                                    "train.sample_chars=0"])  # fmt: skip
    result = train(cfg, data=str(tiny_text_file), run_dir=run, verbose=0,
                   extra_callbacks=[_SpendBudget(clock, at=1, minutes=1)])  # fmt: skip
    assert "run the same command again to continue from epoch 2" in result.stopped_early
    assert result.epochs_done == 1
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "stopped" and info["epochs_done"] == 1
    assert [int(r["epoch"]) for r in _history(run)] == [0], "the cut-short epoch is not recorded"
    meta = json.loads((run / "backup" / "training_metadata.json").read_text())
    assert meta["epoch"] == 1, "the backup holds the last whole epoch"
    assert _tensorboard_steps(run) == [0]

    trained = []

    class Recorder(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            trained.append(epoch)

    result = train(cfg, data=str(tiny_text_file), run_dir=run, verbose=0,
                   extra_callbacks=[Recorder()])  # fmt: skip
    assert trained == [1, 2], "the same command continues with the cut-short epoch"
    assert result.stopped_early == "" and result.epochs_done == 3
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert [int(r["epoch"]) for r in _history(run)] == [0, 1, 2]
    assert not (run / "backup").exists()
    assert _tensorboard_steps(run) == [0, 1, 2], "each epoch once in TensorBoard"


def test_progress_bar_of_an_epoch_cut_short_ends_where_it_stopped(capsys):
    from charrnn_keras.callbacks import Progress

    for verbose, steps_run, shown in [(1, 3, "3/10"), (2, 3, "3/10"), (2, 10, "10/10")]:
        bar = Progress()
        bar.set_params({"verbose": verbose, "epochs": 1, "steps": 10})
        bar.on_train_begin()
        bar.on_epoch_begin(0)
        for step in range(steps_run):
            bar.on_train_batch_end(step, {"loss": 1.0})
        bar.on_epoch_end(0, {"loss": 1.0})
        out = capsys.readouterr().out
        assert shown in out and ("10/10" not in out or steps_run == 10), (verbose, out)


def test_run_json_says_which_path_trained(tiny_run):
    import json

    compute = json.loads((tiny_run / "run.json").read_text(encoding="utf-8"))["compute"]
    assert compute["layer"] == "FastLSTM" and compute["matmul_dtype"] == "float32"
    assert compute["intra_op_threads"] >= 1 and compute["inter_op_threads"] >= 1


def test_final_sample_reuses_the_epoch_sampler_with_the_best_weights(tmp_path, monkeypatch):
    """The sample after training is ``charrnn sample``'s text from the best checkpoint, drawn by
    the per-epoch sample's Sampler: no second model, no second trace of the draw."""
    from charrnn_keras import sampling
    from charrnn_keras import train as train_lib
    from charrnn_keras.session import SAMPLE_TEMPERATURE

    built = []
    init = sampling.Sampler.__init__

    def counting(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(sampling.Sampler, "__init__", counting)
    data = tmp_path / "corpus.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    cfg = load_config(TINY_CONFIG, ["train.epochs=2", "train.sample_chars=30"])
    result = train_lib.train(cfg, data=str(data), run_dir=tmp_path / "run", verbose=0)
    # One Sampler, its draw traced once over two epochs' samples and the final one.
    assert len(built) == 1 and built[0]._draw.experimental_get_tracing_count() == 1
    monkeypatch.undo()
    alone = sampling.Sampler.from_run_dir(tmp_path / "run").sample(
        "", 30, temperature=SAMPLE_TEMPERATURE, seed=cfg.train.seed
    )
    assert result.sample == alone
