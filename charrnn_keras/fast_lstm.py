"""A faster LSTM for CPU training, with the weights and results of ``keras.layers.LSTM``.

``FastLSTM`` is a ``keras.layers.LSTM`` subclass: the same cell, the same variables (``kernel``
``[in, 4u]``, ``recurrent_kernel`` ``[u, 4u]``, ``bias`` ``[4u]``, gates in Keras order i, f, c,
o), the same weight files, and ``layer.cell(x, states)`` works as before. Only the sequence loop
differs, and only on the TensorFlow backend; anything it does not cover (masks, recurrent
dropout, ``go_backwards``, other activations, no bias, single steps, unknown sequence length,
or over ``MAX_UNROLL`` steps except in training on oneDNN's op) runs Keras's own loop.

Where it is built (``native_lstm.py``), training runs oneDNN's fused LSTM primitive, the
kernel PyTorch trains with on a CPU: ``loop="auto"`` takes it when it loads. Elsewhere the
layer's own loop on TensorFlow ops runs (``tf_lstm.py``: large matmuls outside the recurrence,
a hand-written backward, the loop unrolled, optional bf16 matmul operands).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from charrnn_keras import native_lstm, tf_lstm

MAX_UNROLL = 512  # longer sequences use Keras's loop: an unrolled graph grows with the length


@keras.saving.register_keras_serializable(package="charrnn_keras")
class FastLSTM(keras.layers.LSTM):
    """``keras.layers.LSTM`` with a faster loop on the TensorFlow backend.

    The fast loop runs for sequences of 2 or more steps; single steps (the 1x1 sampling model)
    keep Keras's loop. Takes every ``keras.layers.LSTM`` argument, plus:

    Args:
        matmul_dtype: dtype of the matmul operands while training, e.g. ``"bfloat16"`` on a
            CPU with native bf16; None (the default) computes in the layer's compute dtype.
            Inference (validation, sampling) always uses the compute dtype, so reported
            losses and samples are those of the float32 model.
        chains: independent recurrences the batch rows are split into (see
            ``tf_lstm.lstm_sequence``); more than 1 only pays with idle cores and inter-op
            threads.
        time_chunks: blocks of time steps for the input and weight-gradient matmuls (see
            ``tf_lstm.lstm_sequence``); more than 1 lets inter-op threads overlap them with the
            loop.
        loop: the training loop: ``"onednn"``, oneDNN's fused LSTM op (``native_lstm``; bf16
            kernels when ``matmul_dtype`` is bfloat16; ``chains`` and ``time_chunks`` do not
            apply: the op splits the batch by the thread pools, ``native_lstm.op_chains``);
            ``"tensorflow"``, ``tf_lstm.lstm_sequence``'s TensorFlow ops; ``"auto"``, the op
            where it is built and no GPU is visible, else TensorFlow ops. Resolved when the
            layer first trains, so models that never train never load the op.
    """

    LOOPS = ("auto", "onednn", "tensorflow")

    def __init__(self, units, matmul_dtype=None, chains=1, time_chunks=1, loop="auto", **kwargs):
        super().__init__(units, **kwargs)
        if loop not in self.LOOPS:
            raise ValueError(f"loop must be one of {', '.join(self.LOOPS)}, got {loop!r}")
        self.matmul_dtype = matmul_dtype
        self.chains = chains
        self.time_chunks = time_chunks
        self.loop = loop

    def uses_onednn(self) -> bool:
        """Whether training runs oneDNN's fused op (``native_lstm.resolve``)."""
        return native_lstm.resolve(self.loop, bfloat16=self._bf16()) == "onednn"

    def _bf16(self) -> bool:
        return tf.as_dtype(self.matmul_dtype or "float32") == tf.bfloat16

    def fast_path_ok(self, sequences, mask) -> bool:
        """Returns whether the fast loops compute what Keras's loop would for this call (the
        TensorFlow loop also needs at most ``MAX_UNROLL`` steps)."""
        cell = self.cell
        steps = sequences.shape[1]
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.go_backwards
            and steps is not None
            and steps > 1
            and cell.use_bias
            and not cell.recurrent_dropout
            and cell.activation is keras.activations.tanh
            and cell.recurrent_activation is keras.activations.sigmoid
        )

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if not self.fast_path_ok(sequences, mask):
            return super().inner_loop(sequences, initial_state, mask, training=training)
        onednn = training and self.uses_onednn()
        if not onednn and sequences.shape[1] > MAX_UNROLL:
            return super().inner_loop(sequences, initial_state, mask, training=training)
        if training and self.cell.dropout:
            # One input mask for every step, as LSTMCell applies it.
            dp_mask = self.cell.get_dropout_mask(sequences[:, 0, :])
            sequences = sequences * tf.expand_dims(dp_mask, 1)
        weights = [
            tf.convert_to_tensor(w)
            for w in (self.cell.kernel, self.cell.recurrent_kernel, self.cell.bias)
        ]
        if onednn:
            # Training only: what validation, sampling and the export run stays standard ops.
            outputs, h, c = native_lstm.lstm_sequence(
                sequences, *initial_state, *weights, bfloat16=self._bf16(),
                chains=native_lstm.op_chains(),
            )  # fmt: skip
        else:
            outputs, h, c = tf_lstm.lstm_sequence(
                sequences,
                *initial_state,
                *weights,
                matmul_dtype=self.matmul_dtype if training else None,
                chains=self.chains,
                time_chunks=self.time_chunks,
            )
        return h, outputs, [h, c]

    def get_config(self):
        return {
            **super().get_config(),
            "matmul_dtype": self.matmul_dtype,
            "chains": self.chains,
            "time_chunks": self.time_chunks,
            "loop": self.loop,
        }


# Keras keys a layer's weights in .weights.h5 files by its snake-cased class name, not by the
# layer's name. Under LSTM's class name, FastLSTM's weight files and keras.layers.LSTM's are
# interchangeable, so a run can switch model.fast_lstm on or off and keep its checkpoints.
FastLSTM.__name__ = FastLSTM.__qualname__ = "LSTM"
