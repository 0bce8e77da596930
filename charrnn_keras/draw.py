"""How the next character is drawn from logits, shared by the local sampler and the export.

Draws are TensorFlow stateless random ops keyed by ``(seed, position)``: the draw for the n-th
generated character uses ``stateless_fold_in(seed, n)``. Nothing depends on process state, so
the same seed gives the same text in every process, and the exported SavedModel reproduces the
local sampler byte for byte. A CLI ``--seed S`` is the SavedModel seed ``[S, 0]``.
"""

from __future__ import annotations

import tensorflow as tf


def seed_pair(seed: int) -> tf.Tensor:
    """Returns the int64 ``[2]`` seed tensor for a CLI seed: ``[seed, 0]``."""
    return tf.constant([seed, 0], dtype=tf.int64)


def draw_next(logits, temperature, top_k, seed, position):
    """Draws one character id per row.

    Args:
        logits: float ``[batch, vocab]`` unnormalised log-probabilities.
        temperature: float32, a scalar or one per row; logits are divided by it; 0 is argmax.
        top_k: int32, a scalar or one per row; draw only among the k most likely (0 = all).
        seed: int64 ``[2]`` stateless seed.
        position: int scalar, the index of the character being generated.

    Returns:
        int32 ``[batch]`` ids.
    """
    logits = tf.cast(logits, tf.float32)
    batch = tf.shape(logits)[0]
    temperature = tf.broadcast_to(tf.cast(temperature, tf.float32), [batch])
    top_k = tf.broadcast_to(tf.cast(top_k, tf.int32), [batch])
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)

    def keep_top_k():
        k = tf.minimum(top_k, tf.shape(logits)[-1])
        top = tf.math.top_k(logits, tf.reduce_max(k)).values
        kth = tf.gather(top, tf.maximum(k - 1, 0), batch_dims=1)
        kth = tf.where(k > 0, kth, -float("inf"))  # rows with top_k = 0 keep every logit
        return tf.where(logits < kth[:, None], tf.constant(-float("inf"), tf.float32), logits)

    # A sort per character only when a row asks for it.
    masked = tf.cond(tf.reduce_any(top_k > 0), keep_top_k, lambda: logits)
    scaled = masked / tf.maximum(temperature, 1e-6)[:, None]
    key = tf.random.experimental.stateless_fold_in(
        tf.cast(seed, tf.int64), tf.cast(position, tf.int64)
    )
    sampled = tf.random.stateless_categorical(scaled, 1, seed=key, dtype=tf.int32)[:, 0]
    return tf.where(temperature > 0, sampled, greedy)
