"""Callbacks that wrap others: a gate that hides epochs cut short, and one that runs its
callbacks with the averaged weights in the model (``train.ema``)."""

from __future__ import annotations

import logging

import keras

from charrnn_keras.averaging import averaged_pairs, averaged_weights, swap

logger = logging.getLogger(__name__)


class Forward(keras.callbacks.Callback):
    """Passes every training and validation hook to ``callbacks``, in order.

    Args:
        callbacks: the callbacks to wrap, in the order they run.
    """

    def __init__(self, callbacks):
        super().__init__()
        self.callbacks = list(callbacks)
        if not all(isinstance(c, keras.callbacks.Callback) for c in self.callbacks):
            raise ValueError(f"callbacks must be keras.callbacks.Callback, received: {callbacks}")

    def _forward(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def set_model(self, model):
        super().set_model(model)
        for callback in self.callbacks:
            callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        for callback in self.callbacks:
            callback.set_params(params)

    def on_train_begin(self, logs=None):
        self._forward("on_train_begin", logs)

    def on_train_end(self, logs=None):
        self._forward("on_train_end", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._forward("on_epoch_begin", epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._forward("on_epoch_end", epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self._forward("on_train_batch_begin", batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._forward("on_train_batch_end", batch, logs)

    def on_test_begin(self, logs=None):
        self._forward("on_test_begin", logs)

    def on_test_end(self, logs=None):
        self._forward("on_test_end", logs)

    def on_test_batch_begin(self, batch, logs=None):
        self._forward("on_test_batch_begin", batch, logs)

    def on_test_batch_end(self, batch, logs=None):
        self._forward("on_test_batch_end", batch, logs)


class WholeEpochs(Forward):
    """Passes every hook to ``callbacks`` except those of an epoch cut short.

    When ``model.stop_training`` is set before an epoch's last step (a time budget running
    out), Keras still validates and ends that epoch; CSVLogger, ModelCheckpoint and
    TensorBoard would record it as a whole epoch, and again when a resume trains it in full.
    Behind this gate they see only whole epochs.

    Args:
        callbacks: the callbacks to gate, in the order they run.
    """

    def __init__(self, callbacks):
        super().__init__(callbacks)
        self._batches = 0
        self._in_fit = False
        self._cut_short = False

    def _epoch_cut_short(self) -> bool:
        steps = (self.params or {}).get("steps")
        return bool(steps) and self._batches < steps

    def on_train_begin(self, logs=None):
        self._in_fit = True
        self._forward("on_train_begin", logs)

    def on_train_end(self, logs=None):
        self._in_fit = False
        self._forward("on_train_end", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._batches = 0
        self._cut_short = False
        self._forward("on_epoch_begin", epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        self._forward("on_train_batch_end", batch, logs)

    def on_test_begin(self, logs=None):
        # Validation inside fit comes after the epoch's training steps: it is known by now.
        self._cut_short = self._in_fit and self._epoch_cut_short()
        if not self._cut_short:
            self._forward("on_test_begin", logs)

    def on_test_batch_begin(self, batch, logs=None):
        if not self._cut_short:
            self._forward("on_test_batch_begin", batch, logs)

    def on_test_batch_end(self, batch, logs=None):
        if not self._cut_short:
            self._forward("on_test_batch_end", batch, logs)

    def on_test_end(self, logs=None):
        if not self._cut_short:
            self._forward("on_test_end", logs)

    def on_epoch_end(self, epoch, logs=None):
        if self._cut_short or self._epoch_cut_short():
            logger.info("epoch %d stopped after %d of %s steps: not recorded",
                        epoch + 1, self._batches, self.params.get("steps"))  # fmt: skip
            return
        self._forward("on_epoch_end", epoch, logs)


class AveragedWeights(Forward):
    """Passes every hook to ``callbacks``; their validation and epoch ends see the average.

    Keras's validation inside ``fit`` runs between ``on_test_begin`` and ``on_test_end``, so
    the logged ``val_loss`` is the average's. ``on_epoch_end`` (the best checkpoint, the
    history, the sample) runs with the average in the model, and the weights are back before
    the next callback: a backup after this one saves the weights and the average each in its
    place. Without an average (``train.ema = 0``) it only forwards.

    Args:
        callbacks: the callbacks to run with the average, in the order they run.
    """

    def __init__(self, callbacks):
        super().__init__(callbacks)
        self._swapped = []

    def on_test_begin(self, logs=None):
        self._swapped = averaged_pairs(self.model)
        swap(self._swapped)
        self._forward("on_test_begin", logs)

    def on_test_end(self, logs=None):
        self._forward("on_test_end", logs)
        swap(self._swapped)
        self._swapped = []

    def on_epoch_end(self, epoch, logs=None):
        with averaged_weights(self.model):
            self._forward("on_epoch_end", epoch, logs)
