"""Training callbacks that Keras does not ship: state resets, periodic checkpoints named with the
validation loss, a time budget and a sample after every epoch (the backup is in backup.py, the
callbacks that wrap others in forwarding.py)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from charrnn_keras.averaging import averaged_weights
from charrnn_keras.checkpoints import checkpoint_name
from charrnn_keras.distribute import SINGLE
from charrnn_keras.model import reset_states, rnn_layers
from charrnn_keras.replicas import replica_states, set_replica_states

logger = logging.getLogger(__name__)


class ResetStates(keras.callbacks.Callback):
    """Zeroes the recurrent state at each epoch start and around validation.

    The stateful model carries state from batch to batch; validation text is not a continuation
    of where training stopped, nor training of where validation stopped.
    """

    def on_epoch_begin(self, epoch, logs=None):
        reset_states(self.model)

    def on_test_begin(self, logs=None):
        reset_states(self.model)

    def on_test_end(self, logs=None):
        reset_states(self.model)


class TimeBudget(keras.callbacks.Callback):
    """Stops training cleanly once ``max_minutes`` have passed since ``fit`` began.

    Args:
        max_minutes: the budget; 0 disables it.
    """

    def __init__(self, max_minutes: float):
        super().__init__()
        if not max_minutes >= 0:
            raise ValueError(f"max_minutes must be 0 or more, received: max_minutes={max_minutes}")
        self.max_minutes = max_minutes
        self.expired = False
        self._start = None

    def on_train_begin(self, logs=None):
        self._start = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        if self.max_minutes and time.monotonic() - self._start > self.max_minutes * 60:
            self.expired = True
            self.model.stop_training = True


class Progress(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, except that an epoch cut short ends where it stopped.

    Keras finishes the bar at the epoch's step count whatever happened, so a run stopped by
    its time budget after 1 step showed ``239/239``; this one shows ``1/239``. In a run's
    callback list it replaces the bar ``fit`` would add (verbose 1 and 2 alike).
    """

    def on_epoch_end(self, epoch, logs=None):
        if self.progbar is not None and self.target and self.seen < self.target:
            self.progbar.update(self.seen, list((logs or {}).items()), finalize=True)
            return
        super().on_epoch_end(epoch, logs)


class PeriodicCheckpoint(keras.callbacks.Callback):
    """Every ``every`` steps, measures validation loss and saves ``i{step}_l{units}_v{loss}``.

    The recurrent state of the batch in flight is set aside during validation and put back,
    so the checkpoint does not disturb training.

    Args:
        every: steps between checkpoints (> 0).
        directory: where checkpoints go.
        units: ``rnn_size``, for the file name.
        val_data: a tf.data.Dataset of validation batches, or None to name with the train loss.
        steps_per_epoch: to count steps across epochs and resumes.
        topology: where training runs (``distribute.Topology``); ``val_data`` is then the
            distributed validation set.
        val_steps: batches in one pass of a distributed (repeated) ``val_data``.
    """

    def __init__(
        self, every: int, directory, units: int, val_data, steps_per_epoch: int,
        topology=SINGLE, val_steps: int = 0,
    ):  # fmt: skip
        super().__init__()
        if every <= 0:
            raise ValueError(f"every must be greater than 0, received: every={every}")
        self.every = every
        self.directory = Path(directory)
        self.units = units
        self.val_data = val_data
        self.steps_per_epoch = steps_per_epoch
        self.topology, self.val_steps = topology, val_steps
        self._epoch = 0
        self._loss_fn = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self._epoch * self.steps_per_epoch + batch + 1
        if step % self.every:
            return
        with averaged_weights(self.model):  # what the best checkpoint holds too (train.ema)
            loss = self.validation_loss() if self.val_data is not None else (logs or {}).get("loss")
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / checkpoint_name(step, self.units, loss)
            self.model.save_weights(path)
        logger.info("step %d: validation loss %.4f, saved %s", step, loss, path.name)

    def validation_loss(self) -> float:
        """Returns the mean validation loss, leaving the training state as it was."""
        if self._loss_fn is None:
            self._loss_fn = ValidationLoss(self.model, self.val_data, self.topology, self.val_steps)
        return self._loss_fn()


class ValidationLoss:
    """The mean validation loss of a stateful model, measured between training steps.

    The recurrent state of the batch in flight is set aside (every replica's), validation
    starts from zeros, and the state is put back afterwards, so training continues as if
    nothing had happened.

    Args:
        model: the training model.
        val_data: a tf.data.Dataset of ``(inputs, targets)`` validation batches, or under a
            strategy the distributed, repeated validation set.
        topology: where training runs (``distribute.Topology``).
        steps: batches in one pass of a distributed ``val_data``.
    """

    def __init__(self, model, val_data, topology=SINGLE, steps: int = 0):
        self.model, self.val_data, self.topology, self.steps = model, val_data, topology, steps
        strategy = topology.strategy

        def loss(x, y):
            logits = model(x, training=False)
            return tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            )

        if strategy is None:
            self._batch_loss = tf.function(loss)
        else:
            self._batches = iter(val_data)  # repeated: each pass takes exactly ``steps``

            @tf.function
            def batch_loss(batch):
                # Every replica's block has the same number of rows: the mean of the means is
                # the mean over the global batch.
                per_replica = strategy.run(loss, args=batch)
                return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

            self._batch_loss = batch_loss

    def __call__(self) -> float:
        layers = rnn_layers(self.model)
        saved = [[replica_states(self.topology, v) for v in layer.states] for layer in layers]
        reset_states(self.model)
        if self.topology.strategy is None:
            losses = [float(self._batch_loss(x, y)) for x, y in self.val_data]
        else:
            losses = [float(self._batch_loss(next(self._batches))) for _ in range(self.steps)]
        for layer, values in zip(layers, saved, strict=True):
            for var, value in zip(layer.states, values, strict=True):
                set_replica_states(self.topology, var, value)
        return float(np.mean(losses)) if losses else math.nan


class SampleText(keras.callbacks.Callback):
    """Writes a short sample after each epoch with the weights of the moment.

    The sample is logged and written to TensorBoard as text. Once the loss is not finite the
    weights hold NaN or infinities, which sampling cannot draw from, so no sample is written
    for that epoch or any later one (training is stopping anyway: TerminateOnNaN).

    Args:
        sampler: a ``sampling.Sampler`` for this model's config and vocabulary.
        num_chars: characters per sample (> 0).
        log_dir: TensorBoard directory, or None.
        seed: the seed of the first epoch's sample; epoch e's uses ``seed + e - 1``, so each
            sample starts differently and ``charrnn sample --seed`` can write it again.
        temperature: softmax temperature for the sample.
    """

    def __init__(self, sampler, num_chars: int, log_dir=None, seed: int = 0, temperature=0.8):
        super().__init__()
        if num_chars <= 0:
            raise ValueError(f"num_chars must be greater than 0, received: num_chars={num_chars}")
        self.sampler = sampler
        self.num_chars = num_chars
        self.seed = seed
        self.temperature = temperature
        self._writer = tf.summary.create_file_writer(str(log_dir)) if log_dir else None
        self._diverged = False

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._diverged = True
        if self._diverged:
            logger.warning("epoch %d: loss is %s; no sample from these weights", epoch + 1, loss)
            return
        self.sampler.set_weights_from(self.model)
        seed = self.seed + epoch
        text = self.sampler.sample("", self.num_chars, temperature=self.temperature, seed=seed)
        logger.info("sample after epoch %d (seed %d):\n%s", epoch + 1, seed, text)
        if self._writer is not None:
            with self._writer.as_default():
                tf.summary.text("sample", text, step=epoch + 1)
            self._writer.flush()
