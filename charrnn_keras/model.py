"""The network: ``Embedding -> num_layers x stateful RNN (-> Dropout) -> Dense`` logits.

The same function builds the training model (``batch_size x seq_length``) and the 1x1 sampling
model; both have identically named layers, so weights saved from one load into the other.
``generation.Generator`` runs a built model's layers on explicitly passed state.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import keras

from charrnn_keras.config import ModelConfig, TrainConfig
from charrnn_keras.fast_lstm import FastLSTM

_LAYERS = {
    "lstm": keras.layers.LSTM,
    "gru": keras.layers.GRU,
    "rnn": keras.layers.SimpleRNN,
    "fast_lstm": FastLSTM,
}


class CharRNN(keras.Sequential):
    """A Sequential whose weight files are written atomically.

    Every Keras callback that saves (ModelCheckpoint, BackupAndRestore) calls
    ``model.save_weights``, so doing the temporary-name-then-rename here means a crash or a
    full disk never leaves half a checkpoint under the real name.
    """

    def save_weights(self, filepath, overwrite=True, **kwargs):
        path = Path(filepath)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists and overwrite=False")
        tmp = path.with_name(
            f".{path.name.removesuffix('.weights.h5')}.tmp{os.getpid()}.weights.h5"
        )
        try:
            super().save_weights(tmp, overwrite=True, **kwargs)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def build_model(
    cfg: ModelConfig, vocab_size: int, batch_size: int, seq_length: int, name: str = "charrnn"
) -> keras.Sequential:
    """Builds the stateful character model.

    Args:
        cfg: the model settings.
        vocab_size: number of distinct characters (input ids and output logits).
        batch_size: fixed batch size; stateful layers keep one state row per batch row.
        seq_length: time steps per call (1 for the sampling model).
        name: the model's name.

    Returns:
        A built ``CharRNN`` (a ``keras.Sequential``) whose outputs are logits
        ``[batch, seq, vocab_size]``.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got vocab_size={vocab_size}")
    layers = [
        keras.Input(batch_shape=(batch_size, seq_length), dtype="int32", name="char_ids"),
        # N(0, 1) as in torch.nn.Embedding: Keras' default uniform(+-0.05) leaves the LSTM
        # nearly blind to its input for the first hundred or so steps (BENCHMARKS.md, 2).
        keras.layers.Embedding(
            vocab_size,
            cfg.embedding_dim,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
            name="embedding",
        ),
    ]
    for i in range(1, cfg.num_layers + 1):
        layers.append(_recurrent_layer(cfg, name=f"{cfg.cell}_{i}"))
        if cfg.dropout > 0:
            layers.append(keras.layers.Dropout(cfg.dropout, name=f"dropout_{i}"))
    layers.append(keras.layers.Dense(vocab_size, name="logits"))
    return CharRNN(layers, name=name)


def _recurrent_layer(cfg: ModelConfig, name: str) -> keras.layers.RNN:
    """Returns one stateful recurrent layer; FastLSTM keeps LSTM's weights, so names match."""
    common = {"stateful": True, "return_sequences": True, "name": name}
    if not cfg.fast_lstm:
        return _LAYERS[cfg.cell](cfg.rnn_size, **common)
    return _LAYERS["fast_lstm"](
        cfg.rnn_size,
        matmul_dtype=None if cfg.matmul_dtype == "float32" else cfg.matmul_dtype,
        chains=cfg.chains,
        time_chunks=cfg.time_chunks,
        **common,
    )


def rnn_layers(model: keras.Model) -> list:
    """Returns the model's recurrent layers, bottom first."""
    return [layer for layer in model.layers if isinstance(layer, keras.layers.RNN)]


def reset_states(model: keras.Model) -> None:
    """Zeroes the state of every recurrent layer."""
    for layer in rnn_layers(model):
        layer.reset_state()


def bits_per_char(y_true, y_pred):
    """Cross-entropy in bits, from logits."""
    return keras.losses.sparse_categorical_crossentropy(
        y_true, y_pred, from_logits=True
    ) / math.log(2.0)


def compile_model(model: keras.Model, cfg: TrainConfig) -> None:
    """Compiles for training: Adam with global-norm clipping, cross-entropy from logits.

    Args:
        model: the training model.
        cfg: the training settings (learning rate, clipping).
    """
    optimizer = keras.optimizers.Adam(
        learning_rate=cfg.learning_rate, global_clipnorm=cfg.grad_clip or None
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.MeanMetricWrapper(bits_per_char, name="bpc")],
    )
