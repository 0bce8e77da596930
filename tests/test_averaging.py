"""The optimizer beyond Adam's defaults: the moving average of the weights (``train.ema``),
weight decay (``train.weight_decay``) and epsilon (``train.epsilon``)."""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest
from conftest import TINY_CONFIG, TINY_TEXT

from charrnn_keras import data as data_lib
from charrnn_keras.averaging import averaged_weights
from charrnn_keras.callbacks import ValidationLoss
from charrnn_keras.checkpoints import find_checkpoint, load_weights
from charrnn_keras.config import load_config
from charrnn_keras.errors import Interrupted
from charrnn_keras.model import build_model, compile_model
from charrnn_keras.rundir import load_run
from charrnn_keras.train import train

EMA = ["train.ema=0.8", "train.sample_chars=0"]


def _compiled(*overrides, vocab=12, batch=2, seq=4):
    cfg = load_config(TINY_CONFIG, list(overrides))
    keras.utils.set_random_seed(0)
    model = build_model(cfg.model, vocab, batch, seq)
    compile_model(model, cfg.train)
    return model


def _values(variables) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in variables]


def _steps(model, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        x = rng.integers(0, 12, (2, 4))
        model.train_on_batch(x, np.roll(x, -1, axis=1))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_averaged_weights_are_in_the_model_inside_and_the_weights_come_back_bit_for_bit():
    model = _compiled("train.ema=0.8")
    _steps(model, 4)
    weights = _values(model.trainable_variables)
    averages = _values(model.optimizer._model_variables_moving_average)
    assert not _same(weights, averages)  # four steps apart: something to swap
    with averaged_weights(model):
        assert _same(_values(model.trainable_variables), averages)
    assert _same(_values(model.trainable_variables), weights)
    assert _same(_values(model.optimizer._model_variables_moving_average), averages)


def test_averaged_weights_without_an_average_change_nothing():
    model = _compiled()
    _steps(model, 2)
    weights = _values(model.trainable_variables)
    with averaged_weights(model):
        assert _same(_values(model.trainable_variables), weights)
    assert _same(_values(model.trainable_variables), weights)


def test_weight_decay_shrinks_kernels_and_spares_biases():
    plain, decayed = _compiled(), _compiled("train.weight_decay=5.0")
    _steps(plain, 1)
    _steps(decayed, 1)  # the same start and batch: the same gradient, the same Adam step
    for p, d in zip(plain.trainable_variables, decayed.trainable_variables, strict=True):
        if p.name == "bias":
            np.testing.assert_array_equal(p.numpy(), d.numpy())
        else:  # every other variable: shrunk by learning_rate * weight_decay of itself
            assert np.abs(d.numpy()).sum() < np.abs(p.numpy()).sum(), p.path


def _first_step_moves(*overrides) -> np.ndarray:
    model = _compiled("train.grad_clip=0", *overrides)
    before = _values(model.trainable_variables)
    _steps(model, 1)
    after = _values(model.trainable_variables)
    return np.concatenate([np.abs(a - b).ravel() for a, b in zip(before, after, strict=True)])


def test_epsilon_sets_how_far_small_gradients_move_at_the_first_step():
    # Adam's first step moves a weight by lr * |g| / (|g| + epsilon / sqrt(1 - beta_2)) in
    # Keras: the learning rate itself where epsilon is negligible, less where it is not.
    lr = load_config(TINY_CONFIG).train.learning_rate
    tiny, large = _first_step_moves("train.epsilon=1e-12"), _first_step_moves("train.epsilon=1e-4")
    moved = tiny > 0  # weights with a gradient (the first step's recurrent input is zero)
    assert moved.mean() > 0.5
    np.testing.assert_allclose(np.median(tiny[moved]), lr, rtol=1e-4)
    assert np.median(large[moved]) < 0.9 * lr


class _Recorder(keras.callbacks.Callback):
    """Keeps the weights and their average at every epoch end (run first: the raw weights)."""

    def __init__(self, stop_before: int | None = None):
        super().__init__()
        self.weights, self.averages, self.stop_before = [], [], stop_before

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.stop_before:
            raise KeyboardInterrupt  # as Ctrl-C: the run keeps its backup of the epochs before

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(_values(self.model.trainable_variables))
        self.averages.append(_values(self.model.optimizer._model_variables_moving_average))


def _train(tmp_path, name, *overrides, **kwargs):
    data = tmp_path / "text.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    cfg = load_config(TINY_CONFIG, [*EMA, *overrides])
    return train(cfg, data=str(data), run_dir=tmp_path / name, verbose=0, **kwargs)


def test_validation_and_the_best_checkpoint_are_of_the_averaged_weights(tmp_path):
    recorder = _Recorder()
    _train(tmp_path, "run", "train.epochs=3", extra_callbacks=[recorder])
    run = tmp_path / "run"
    with open(run / "history.csv", newline="") as f:
        val_losses = [float(row["val_loss"]) for row in csv.DictReader(f)]
    best = int(np.argmin(val_losses))

    cfg, vocab = load_run(run)
    model = build_model(cfg.model, len(vocab), cfg.data.batch_size, cfg.data.seq_length)
    load_weights(model, find_checkpoint(run), vocab)
    saved = _values(model.trainable_variables)
    assert _same(saved, recorder.averages[best])
    assert not _same(saved, recorder.weights[best])
    # The logged validation loss is the average's: the checkpoint scores it again.
    _, val_ids = data_lib.split(vocab.encode(TINY_TEXT), cfg.data.val_fraction)
    val_ds, _ = data_lib.make_dataset(val_ids, cfg.data.batch_size, cfg.data.seq_length)
    assert ValidationLoss(model, val_ds)() == pytest.approx(val_losses[best], rel=1e-5)


@pytest.mark.slow
def test_a_resumed_run_is_the_run_that_was_not_interrupted(tmp_path):
    # The backup holds the weights and the average each in its place, and the swaps around
    # validation and the checkpoints are exact: resuming changes nothing, bit for bit.
    whole = _Recorder()
    _train(tmp_path, "whole", "train.epochs=3", extra_callbacks=[whole])
    with pytest.raises(Interrupted):
        _train(tmp_path, "cut", "train.epochs=3", extra_callbacks=[_Recorder(stop_before=2)])
    resumed = _Recorder()
    _train(tmp_path, "cut", "train.epochs=3", extra_callbacks=[resumed])
    assert len(resumed.weights) == 1  # only the third epoch trained again
    assert _same(resumed.weights[0], whole.weights[2])
    assert _same(resumed.averages[0], whole.averages[2])
