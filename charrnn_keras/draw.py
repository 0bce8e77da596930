"""How the next character is drawn from logits, shared by the local sampler and the export.

Draws are TensorFlow stateless random ops keyed by ``(seed, position)``: the draw for the n-th
generated character uses ``stateless_fold_in(seed, n)``. Nothing depends on process state, so
the same seed gives the same text in every process, and the exported SavedModel reproduces the
local sampler byte for byte. A CLI ``--seed S`` is the SavedModel seed ``[S, 0]``.

With one seed per row (``[batch, 2]``), each row is drawn exactly as it would be alone, so a
row of a batch is always the text that row gets by itself.
"""

from __future__ import annotations

import tensorflow as tf

_NEG_INF = -float("inf")


def seed_pair(seed: int) -> tf.Tensor:
    """Returns the int64 ``[2]`` seed tensor for a CLI seed: ``[seed, 0]``."""
    return tf.constant([seed, 0], dtype=tf.int64)


def draw_next(logits, temperature, top_k, seed, position, top_p=1.0):
    """Draws one character id per row.

    The order is top-k on the logits, then the temperature, then top-p on the tempered
    distribution (as KerasHub's ``TopPSampler`` applies its softmax(logits / temperature)).

    Args:
        logits: float ``[batch, vocab]`` unnormalised log-probabilities.
        temperature: float32, a scalar or one per row; logits are divided by it; 0 is argmax.
        top_k: int32, a scalar or one per row; draw only among the k most likely (0 = all).
        seed: int64 ``[2]``, one stateless seed for the batch, or ``[batch, 2]``, one per row.
        position: int scalar, the index of the character being generated.
        top_p: float32, a scalar or one per row; draw only among the most likely characters
            whose probabilities add up to ``top_p`` (nucleus sampling; 1 = all).

    Returns:
        int32 ``[batch]`` ids.
    """
    logits = tf.cast(logits, tf.float32)
    batch = tf.shape(logits)[0]
    temperature = tf.broadcast_to(tf.cast(temperature, tf.float32), [batch])
    top_k = tf.broadcast_to(tf.cast(top_k, tf.int32), [batch])
    top_p = tf.broadcast_to(tf.cast(top_p, tf.float32), [batch])
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    # A sort per character only when a row asks for it.
    masked = tf.cond(tf.reduce_any(top_k > 0), lambda: _keep_top_k(logits, top_k), lambda: logits)
    scaled = masked / tf.maximum(temperature, 1e-6)[:, None]
    scaled = tf.cond(tf.reduce_any(top_p < 1), lambda: _keep_top_p(scaled, top_p), lambda: scaled)
    position = tf.cast(position, tf.int64)
    seed = tf.cast(seed, tf.int64)
    if seed.shape.rank == 1:
        sampled = _categorical(scaled, seed, position)
    else:
        sampled = tf.cond(
            batch == 1,
            lambda: _categorical(scaled, seed[0], position),
            lambda: tf.map_fn(
                lambda row: _categorical(row[0][None], row[1], position)[0],
                (scaled, seed),
                fn_output_signature=tf.int32,
            ),
        )
    return tf.where(temperature > 0, sampled, greedy)


def _categorical(scaled, seed, position):
    key = tf.random.experimental.stateless_fold_in(seed, position)
    return tf.random.stateless_categorical(scaled, 1, seed=key, dtype=tf.int32)[:, 0]


def _keep_top_k(logits, top_k):
    k = tf.minimum(top_k, tf.shape(logits)[-1])
    top = tf.math.top_k(logits, tf.reduce_max(k)).values
    kth = tf.gather(top, tf.maximum(k - 1, 0), batch_dims=1)
    kth = tf.where(k > 0, kth, _NEG_INF)  # rows with top_k = 0 keep every logit
    return tf.where(logits < kth[:, None], _NEG_INF, logits)


def _keep_top_p(scaled, top_p):
    """Keeps the smallest set of most likely characters whose probability reaches ``top_p``.

    The most likely character is always kept; rows with ``top_p >= 1`` keep every character.
    """
    probs = tf.nn.softmax(scaled)
    order = tf.argsort(probs, direction="DESCENDING", stable=True)
    before = tf.math.cumsum(tf.gather(probs, order, batch_dims=1), axis=-1, exclusive=True)
    keep_sorted = (before <= top_p[:, None]) | (top_p[:, None] >= 1)
    keep = tf.gather(keep_sorted, tf.argsort(order, stable=True), batch_dims=1)
    return tf.where(keep, scaled, _NEG_INF)
