"""The network: ``Embedding -> num_layers x stateful RNN (-> Dropout) -> Dense`` logits.

The same function builds the training model (``batch_size x seq_length``) and the 1x1 sampling
model; both have identically named layers, so weights saved from one load into the other.
``generation.Generator`` runs a built model's layers on explicitly passed state.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import shutil
from pathlib import Path

import h5py
import keras

from charrnn_keras import atomic, initializers, native_lstm
from charrnn_keras.config import ModelConfig, TrainConfig
from charrnn_keras.cpu import native_bf16
from charrnn_keras.fast_lstm import FastLSTM
from charrnn_keras.replicas import GlobalClipAdam, multi_worker_logs
from charrnn_keras.vocab import Vocab

_LAYERS = {
    "lstm": keras.layers.LSTM,
    "gru": keras.layers.GRU,
    "rnn": keras.layers.SimpleRNN,
    "fast_lstm": FastLSTM,
}


# The HDF5 attribute of a weights file that names the vocabulary its ids belong to.
VOCAB_ATTR = "charrnn_vocab_sha256"


def vocab_fingerprint(vocab: Vocab) -> str:
    """Returns the sha256 of a vocabulary's characters in id order (hex).

    Two vocabularies of the same size give weights of the same shapes; only this tells
    whether id 7 means the same character in both.

    Args:
        vocab: the vocabulary.

    Returns:
        64 hex digits.
    """
    return hashlib.sha256("".join(vocab.chars).encode("utf-8", "surrogatepass")).hexdigest()


def read_fingerprint(path: str | Path) -> str | None:
    """Reads the vocabulary fingerprint that ``CharRNN.save_weights`` stores in a weights file.

    Args:
        path: a ``.weights.h5`` file.

    Returns:
        The fingerprint (64 hex digits), or None for a file written without one.

    Raises:
        OSError: the file cannot be opened as HDF5.
    """
    with h5py.File(path, "r") as f:
        value = f.attrs.get(VOCAB_ATTR)
    if value is None:
        return None
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


class CharRNN(keras.Sequential):
    """A Sequential whose weight files are written atomically and name their vocabulary.

    Every Keras callback that saves (ModelCheckpoint, BackupAndRestore) calls
    ``model.save_weights``, so doing the temporary-name-then-rename here means a crash or a
    full disk never leaves half a checkpoint under the real name. ``vocab_sha256`` (set by
    ``build_model``'s ``vocab``) is stored in every file as the ``VOCAB_ATTR`` attribute, so
    that ``checkpoints.load_weights`` can refuse a checkpoint of another vocabulary.
    """

    vocab_sha256: str | None = None

    def save_weights(self, filepath, overwrite=True, **kwargs):
        path = Path(filepath)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists and overwrite=False")
        # h5py that meets a full disk raises inside destructors and the process dies by
        # SIGSEGV, so a file that cannot fit must be refused before h5py starts writing.
        _check_free_space(path, self.weights_file_bytes())
        with atomic.replacing(path) as tmp:
            super().save_weights(tmp, overwrite=True, **kwargs)
            if self.vocab_sha256:
                with h5py.File(tmp, "a") as f:
                    f.attrs[VOCAB_ATTR] = self.vocab_sha256

    def train_step(self, data):
        return multi_worker_logs(super().train_step(data))

    def test_step(self, data):
        return multi_worker_logs(super().test_step(data))

    def weights_file_bytes(self) -> int:
        """Estimates the size of the file ``save_weights`` writes, erring high.

        Keras stores the model's variables and the optimizer's; HDF5 adds a header and a
        little per variable (measured: about 1 KiB; 2 KiB is allowed).

        Returns:
            Bytes.
        """
        variables = list(self.variables)
        optimizer = getattr(self, "optimizer", None)  # none before compile()
        if optimizer is not None and optimizer.built:
            variables += list(optimizer.variables)
        data = sum(math.prod(v.shape) * _dtype_bytes(v.dtype) for v in variables)
        return data + 2048 * len(variables) + 16384


def _dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype named like ``float32``."""
    digits = "".join(c for c in str(dtype) if c.isdigit())
    return max(int(digits) // 8, 1) if digits else 8


def _check_free_space(path: Path, needed: int) -> None:
    """Raises StorageError (ENOSPC) when ``path``'s folder has less than ``needed`` bytes free."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return  # a missing folder: the write itself reports it
    if free < needed:
        e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        raise atomic.storage_error(e, path)


def build_model(
    cfg: ModelConfig,
    vocab_size: int,
    batch_size: int,
    seq_length: int,
    name: str = "charrnn",
    vocab: Vocab | None = None,
) -> keras.Sequential:
    """Builds the stateful character model.

    Args:
        cfg: the model settings.
        vocab_size: number of distinct characters (input ids and output logits).
        batch_size: fixed batch size; stateful layers keep one state row per batch row.
        seq_length: time steps per call (1 for the sampling model).
        name: the model's name.
        vocab: the run's vocabulary (``vocab_size`` characters): its fingerprint goes into
            every weights file the model saves. None writes files without one.

    Returns:
        A built ``CharRNN`` (a ``keras.Sequential``) whose outputs are logits
        ``[batch, seq, vocab_size]``.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got vocab_size={vocab_size}")
    if vocab is not None and len(vocab) != vocab_size:
        raise ValueError(
            f"vocab has {len(vocab)} characters but vocab_size={vocab_size}; they must agree"
        )
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
    layers.append(
        keras.layers.Dense(vocab_size, name="logits", **initializers.dense(cfg.init, cfg.rnn_size))
    )
    model = CharRNN(layers, name=name)
    if vocab is not None:
        model.vocab_sha256 = vocab_fingerprint(vocab)
    return model


def _recurrent_layer(cfg: ModelConfig, name: str) -> keras.layers.RNN:
    """Returns one stateful recurrent layer; FastLSTM keeps LSTM's weights, so names match."""
    common = {"stateful": True, "return_sequences": True, "name": name}
    common.update(initializers.recurrent(cfg.init, cfg.rnn_size, cfg.cell))
    if not (cfg.fast_lstm and cfg.cell == "lstm"):
        return _LAYERS[cfg.cell](cfg.rnn_size, **common)
    dtype = matmul_dtype(cfg)
    return _LAYERS["fast_lstm"](
        cfg.rnn_size,
        matmul_dtype=None if dtype == "float32" else dtype,
        chains=cfg.chains,
        time_chunks=cfg.time_chunks,
        loop=cfg.lstm_loop,  # resolved when it trains: sampling models never load the op
        **common,
    )


def lstm_loop(cfg: ModelConfig) -> str:
    """FastLSTM's training loop for ``cfg``, ``onednn`` or ``tensorflow`` (``native_lstm.resolve``).

    Raises:
        ConfigError: ``onednn`` was asked for and the op is not built, or cannot run bf16 here.
    """
    return native_lstm.resolve(cfg.lstm_loop, bfloat16=matmul_dtype(cfg) == "bfloat16")


def matmul_dtype(cfg: ModelConfig) -> str:
    """The dtype the training matmuls run in: ``auto`` is bfloat16 where the CPU multiplies
    bf16 natively, float32 elsewhere."""
    if cfg.matmul_dtype != "auto":
        return cfg.matmul_dtype
    return "bfloat16" if native_bf16() else "float32"


def compute_path(cfg: ModelConfig) -> dict:
    """What actually trains: the recurrent layer class, its matmul dtype and loop, and the
    chains each layer's batch is split into (for run.json; call once the pools are set)."""
    layer = _LAYERS[cfg.cell]
    if cfg.fast_lstm and cfg.cell == "lstm":
        path = {"layer": "FastLSTM", "matmul_dtype": matmul_dtype(cfg), "lstm_loop": lstm_loop(cfg)}
        if path["lstm_loop"] == "tensorflow":
            path.update(chains=cfg.chains, time_chunks=cfg.time_chunks)
        else:  # the op splits the batch by the thread pools, not by the config
            path.update(chains=native_lstm.op_chains())
        return path
    return {"layer": f"keras.layers.{layer.__name__}", "matmul_dtype": "float32"}


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


def compile_model(model: keras.Model, cfg: TrainConfig, distributed: bool = False) -> None:
    """Compiles for training: Adam with global-norm clipping, cross-entropy from logits.

    Args:
        model: the training model.
        cfg: the training settings (learning rate, clipping, weight decay, weight average).
        distributed: the model trains under a ``tf.distribute`` strategy: clip the summed
            gradient, not each replica's share (``replicas.GlobalClipAdam``).
    """
    options = dict(
        learning_rate=cfg.learning_rate,
        epsilon=cfg.epsilon,
        weight_decay=cfg.weight_decay or None,
    )
    if cfg.ema:
        options.update(use_ema=True, ema_momentum=cfg.ema)
    if distributed:
        optimizer = GlobalClipAdam(cfg.grad_clip, **options)
    else:
        optimizer = keras.optimizers.Adam(global_clipnorm=cfg.grad_clip or None, **options)
    if cfg.weight_decay:
        # Biases set offsets (the forget gate's starts at 1), not the model's capacity.
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.MeanMetricWrapper(bits_per_char, name="bpc")],
    )
    # Built now, in the caller's scope: a strategy then mirrors its variables, which Keras
    # would otherwise create while tracing a replica's first step.
    optimizer.build(model.trainable_variables)
