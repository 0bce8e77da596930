"""How the next character is drawn from logits, shared by the local sampler and the export.

A draw is keyed by ``(seed, position)``: the n-th generated character of a row takes
``argmax(logits + Gumbel noise)`` (the Gumbel-max trick, a draw from the softmax), where the
noise is a counter-based hash (splitmix64) of the row's seed, n and each character. Nothing
depends on process state or on the other rows, so the same seed gives the same text in every
process, the exported SavedModel reproduces the local sampler byte for byte, and a row of a
batch is always the text that row gets alone, in one vectorised op chain (TensorFlow's
stateless categorical takes one seed per call, so per-row seeds would need a loop over rows:
0.66x the characters/s at batch 8). A CLI ``--seed S`` is the SavedModel seed ``[S, 0]``.
Only standard TensorFlow ops are used, so TF Serving runs it as it is.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

_NEG_INF = -float("inf")


def seed_pair(seed: int) -> tf.Tensor:
    """Returns the int64 ``[2]`` seed tensor for a CLI seed: ``[seed, 0]``."""
    return tf.constant([seed, 0], dtype=tf.int64)


def draw_next(logits, temperature, top_k, seed, position, top_p=1.0, noise=None):
    """Draws one character id per row.

    The order is top-k on the logits, then the temperature, then top-p on the tempered
    distribution (as KerasHub's ``TopPSampler`` applies its softmax(logits / temperature)).

    Args:
        logits: float ``[batch, vocab]`` unnormalised log-probabilities.
        temperature: float32, a scalar or one per row; logits are divided by it; 0 is argmax.
        top_k: int32, a scalar or one per row; draw only among the k most likely (0 = all).
        seed: int64 ``[batch, 2]``, one seed per row, or ``[2]``, the same for every row.
        position: int scalar, the index of the character being generated.
        top_p: float32, a scalar or one per row; draw only among the most likely characters
            whose probabilities add up to ``top_p`` (nucleus sampling; 1 = all).
        noise: this position's row of ``gumbel_block(seed, position, ...)``, if the caller
            made it ahead (then ``seed`` and ``position`` are not read).

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
    if noise is None:
        noise = gumbel_block(seed, position, 1, batch, tf.shape(logits)[-1])[0]
    sampled = tf.argmax(scaled + noise, axis=-1, output_type=tf.int32)
    return tf.where(temperature > 0, sampled, greedy)


# splitmix64's constants: the increment (the golden ratio in 64 bits) and its two multipliers.
_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(z):
    """splitmix64's finaliser: a bijection of uint64 whose output bits each depend on all."""
    for shift, multiplier in ((30, _M1), (27, _M2)):
        z = _xor_shift(z, shift) * tf.constant(multiplier, tf.uint64)
    return _xor_shift(z, 31)


def _xor_shift(z, shift: int):
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(shift, tf.uint64)))


def gumbel_block(seed, start, steps, batch, vocab):
    """Gumbel(0, 1) noise ``[steps, batch, vocab]`` for positions ``start .. start + steps - 1``.

    ``argmax(logits + noise)`` is a draw from ``softmax(logits)`` (the Gumbel-max trick), and
    the noise is a counter-based hash of (seed, position, character): every row is drawn
    exactly as it would be alone, in one vectorised op chain instead of a loop over rows.
    Every number depends on its own (seed, position, character) only, so a block of positions
    made at once holds the numbers each position would get alone; a generation loop makes
    them ahead in blocks, one op chain per block instead of about 30 ops per character.

    Args:
        seed: int64 ``[batch, 2]`` (one per row) or ``[2]`` (every row).
        start: int scalar, the first position.
        steps: int scalar, how many positions.
        batch: int scalar, rows.
        vocab: int scalar, characters.

    Returns:
        float32 ``[steps, batch, vocab]``.
    """
    bits = tf.bitcast(tf.broadcast_to(tf.cast(seed, tf.int64), [batch, 2]), tf.uint64)
    golden = tf.constant(_GOLDEN, tf.uint64)
    key = _mix(tf.bitwise.bitwise_xor(_mix(bits[:, 0] + golden), bits[:, 1]))
    positions = tf.range(
        tf.cast(start, tf.int64), tf.cast(start, tf.int64) + tf.cast(steps, tf.int64)
    )
    key = _mix(
        tf.bitwise.bitwise_xor(key[None, :], tf.bitcast(positions, tf.uint64)[:, None] * golden)
    )
    counters = tf.cast(tf.range(1, vocab + 1), tf.uint64) * golden
    z = tf.bitwise.right_shift(_mix(key[:, :, None] + counters), tf.constant(11, tf.uint64))
    u = (tf.cast(z, tf.float64) + 0.5) / 2.0**53  # in (0, 1), never 0 or 1
    return tf.cast(-tf.math.log(-tf.math.log(u)), tf.float32)


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


class Draw(NamedTuple):
    """The draw settings of each row, as tensors (see ``draw_next``).

    Args:
        temperature: float32 ``[batch]``; 0 is argmax.
        top_k: int32 ``[batch]``; 0 is all characters.
        top_p: float32 ``[batch]``; 1 is all characters.
        seed: int64 ``[2]`` shared by the rows, or ``[batch, 2]``, one per row (then each row
            is drawn exactly as it would be alone).
        words: bool ``[batch]``: inside a word (after anything but a space) take the most
            likely character; draw only after a space.
    """

    temperature: tf.Tensor
    top_k: tf.Tensor
    top_p: tf.Tensor
    seed: tf.Tensor
    words: tf.Tensor
