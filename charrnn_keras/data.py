"""Splits and the stateful batch layout (reading the text is corpus.py).

The layout is the one a stateful RNN needs: each split is cut into ``batch_size`` contiguous
streams, and batch k holds characters ``[k*seq_length, (k+1)*seq_length)`` of every stream, so
row i of batch k+1 continues exactly where row i of batch k ended. Targets are the inputs
shifted by one character. Batches are never shuffled.
"""

from __future__ import annotations

import numpy as np

from charrnn_keras.errors import DataError

# Batches made ahead of the step: one in flight while the next waits; a batch is a gather.
PREFETCH = 2


def split(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(train, val)``: val is the last ``val_fraction`` of the text."""
    n_train = len(ids) - int(len(ids) * val_fraction)
    return ids[:n_train], ids[n_train:]


def min_chars(batch_size: int, seq_length: int, val_fraction: float) -> int:
    """Returns the smallest corpus that gives one batch of training (and of validation)."""
    need = batch_size * seq_length + 1
    if val_fraction <= 0:
        return need
    # Both splits need `need` characters; int() truncation in split() may cost one more.
    return max(int(np.ceil(need / val_fraction)), int(np.ceil(need / (1 - val_fraction)))) + 1


def check_size(n_chars: int, batch_size: int, seq_length: int, val_fraction: float) -> None:
    """Raises DataError when the corpus cannot fill one batch of each split."""
    need = min_chars(batch_size, seq_length, val_fraction)
    train, val = split(np.empty(n_chars, np.uint8), val_fraction)
    too_small = len(train) < batch_size * seq_length + 1 or (
        val_fraction > 0 and len(val) < batch_size * seq_length + 1
    )
    if too_small:
        raise DataError(
            f"corpus has {n_chars:,} characters; batch_size={batch_size} x "
            f"seq_length={seq_length} with val_fraction={val_fraction} needs at least "
            f"{need:,}. Use more text or lower data.batch_size / data.seq_length"
        )


def num_batches(length: int, batch_size: int, seq_length: int) -> int:
    """Batches per epoch of a split of ``length`` characters (DataError if none fits)."""
    count = (length - 1) // (batch_size * seq_length)
    if count < 1:
        raise DataError(
            f"a split of {length:,} characters is too small for one batch of "
            f"{batch_size} x {seq_length}"
        )
    return count


def stream_batches(ids: np.ndarray, batch_size: int, seq_length: int):
    """Lays out a split as ``batch_size`` parallel streams, as numpy arrays.

    ``make_dataset`` yields the same batches without materialising them; this is the layout's
    reference (the tests and the PyTorch benchmark use it).

    Args:
        ids: one split of the encoded text.
        batch_size: rows per batch.
        seq_length: characters per row per batch.

    Returns:
        ``(x, y)``, each ``[num_batches, batch_size, seq_length]``, where ``y`` is ``x`` shifted
        by one character and ``x[k+1, i, 0]`` follows ``x[k, i, -1]`` in the text.
    """
    steps = num_batches(len(ids), batch_size, seq_length)
    n = steps * batch_size * seq_length

    def layout(a):
        return np.ascontiguousarray(a.reshape(batch_size, steps, seq_length).transpose(1, 0, 2))

    return layout(ids[:n]), layout(ids[1 : n + 1])


def make_dataset(ids: np.ndarray, batch_size: int, seq_length: int, replicas=1, local=(0,)):
    """Returns a tf.data.Dataset of ``(inputs, targets)`` int32 batches in stream order.

    The batches are those of ``stream_batches``, gathered one at a time from a single copy of
    the split, so a large corpus costs its own size once more, not four times.

    Args:
        ids: one split of the encoded text.
        batch_size: rows per batch (all replicas' rows).
        seq_length: characters per row per batch.
        replicas: split every batch's rows into this many equal blocks, replica k's being
            rows ``[k * b, (k + 1) * b)`` with ``b = batch_size // replicas``.
        local: the replicas whose blocks this dataset yields: for each step, each of their
            blocks in this order (as ``tf.distribute`` hands a worker's elements to its
            replicas in turn).

    Returns:
        ``(dataset, num_batches)``.
    """
    import tensorflow as tf

    steps = num_batches(len(ids), batch_size, seq_length)
    n = steps * batch_size * seq_length
    text = tf.constant(ids[: n + 1])
    # Row i is the i-th of batch_size equal stretches of the text; batch k takes its k-th piece.
    stretch = steps * seq_length
    rows = batch_size // replicas
    local = list(local)
    first_rows = tf.constant([k * rows for k in local], tf.int64)
    offsets = tf.range(rows, dtype=tf.int64)[:, None] * stretch + tf.range(
        seq_length, dtype=tf.int64
    )

    def batch(i):
        step, block = i // len(local), i % len(local)
        index = offsets + first_rows[block] * stretch + step * seq_length
        return (
            tf.cast(tf.gather(text, index), tf.int32),
            tf.cast(tf.gather(text, index + 1), tf.int32),
        )

    ds = tf.data.Dataset.range(steps * len(local)).map(batch).prefetch(PREFETCH)
    # Autotuning off: with it, epochs on a 2-core machine waited 9-19 s for their first batch
    # (BENCHMARKS.md, "Time between steps"); a gather per batch needs no tuning.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options), steps
