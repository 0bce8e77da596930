"""The generation loops over ``lstm_step.FusedStep``: feed a prime, draw characters.

They write what ``Generator``'s loops over Keras's cells write, with fewer ops per character:

- the Gumbel noise of the draw is made ahead for blocks of ``BLOCK`` positions (an outer loop
  over blocks, an inner loop over characters), one op chain per block instead of about 30 ops
  per character; the numbers are those of each position alone (``draw.gumbel_block``);
- which draw a request needs is decided once per call, not per character: when every row
  samples plainly (temperature above 0, no top-k, no top-p, strategy ``sample``) the step
  ends with ``argmax(logits / temperature + noise)``, what ``draw_next`` computes for such
  rows without its two conds, its argmax for greedy rows and its final select; any other
  request runs ``draw_next`` itself on the block's noise.
"""

from __future__ import annotations

import tensorflow as tf

from charrnn_keras.draw import draw_next, gumbel_block

# Positions of noise made at once: [64, batch, vocab] float32 is 17 KB a row for 65
# characters, and one block chain per 64 characters is negligible next to the steps.
BLOCK = 64


def feed(step, weights, ids, lengths, states: list) -> list:
    """``Generator.feed`` over a FusedStep: advances each row over its first ``lengths[b]`` ids.

    Args:
        step: the FusedStep.
        weights: ``step.weights()``.
        ids: int32 ``[batch, time]``, padded.
        lengths: int32 ``[batch]``; rows past their length keep their state.
        states: the state to start from.

    Returns:
        The new states.
    """

    def body(t, states):
        _, new = step(weights, ids[:, t], states)
        active = (t < lengths)[:, None]
        return t + 1, [tf.where(active, n, o) for n, o in zip(new, states, strict=True)]

    _, states = tf.while_loop(
        lambda t, _: t < tf.reduce_max(lengths), body, (tf.constant(0), states)
    )
    return states


def draw(step, weights, prev, states: list, count, settings, start, space_id: int, frozen=None):
    """``Generator.draw`` over a FusedStep (same arguments and results, same text).

    Args:
        step: the FusedStep.
        weights: ``step.weights()``.
        prev: int32 ``[batch]``, the last character fed.
        states: the state before ``prev`` is fed.
        count: int32 scalar, characters to draw.
        settings: ``generation.Draw``.
        start: int64 scalar, the position of the first draw.
        space_id: the vocabulary's space (-1: none), for strategy ``words``.
        frozen: ``step.weights(frozen=True)``: the plain draw's inner loop then holds the
            weights as its own constants. A tensor from outside a ``tf.while_loop`` enters it
            as one more loop variable, and each loop variable costs four executor nodes per
            character (Merge, Switch, Identity, NextIteration); ten weights would double the
            nodes of the step.

    Returns:
        ``(ids [batch, count], last id [batch], states)``.
    """
    batch = tf.shape(prev)[0]
    vocab = tf.shape(weights[0])[0]
    t = tf.broadcast_to(settings.temperature, [batch])
    words = tf.broadcast_to(settings.words, [batch])
    plain = (tf.reduce_all(t > 0) & ~tf.reduce_any(words)
             & ~tf.reduce_any(settings.top_k > 0) & ~tf.reduce_any(settings.top_p < 1))  # fmt: skip
    divisor = tf.maximum(t, 1e-6)[:, None]

    def plain_draw(logits, prev, noise):
        return tf.argmax(logits / divisor + noise, axis=-1, output_type=tf.int32)

    def full_draw(logits, prev, noise):
        temperature = tf.where(words & (prev != space_id), 0.0, t)
        # draw_next reads neither seed nor position when given the noise.
        return draw_next(logits, temperature, settings.top_k, settings.seed, start,
                         settings.top_p, noise=noise)  # fmt: skip

    def run(pick, weights):
        # Slot 0 is a dummy so that stack() works for count == 0.
        out = tf.TensorArray(tf.int32, size=count + 1, element_shape=tf.TensorShape([None]))
        out = out.write(0, tf.zeros([batch], tf.int32))

        def block(i0, prev, states, out):
            n = tf.minimum(BLOCK, count - i0)
            noise = gumbel_block(settings.seed, start + tf.cast(i0, tf.int64), n, batch, vocab)

            # j counts from i0 + 1: out's slot and the loop counter in one add.
            def body(j, prev, states, out):
                logits, states = step(weights, prev, states)
                drawn = pick(logits, prev, noise[j - i0 - 1])
                drawn.set_shape(prev.shape)  # the batch is dynamic in the noise's shape
                return j + 1, drawn, states, out.write(j, drawn)

            end = i0 + n
            _, prev, states, out = tf.while_loop(
                lambda j, *_: j <= end, body, (i0 + 1, prev, states, out)
            )
            return end, prev, states, out

        _, last, new, out = tf.while_loop(
            lambda i0, *_: i0 < count, block, (tf.constant(0), prev, states, out)
        )
        return [out.stack()[1:], last, *new]

    result = tf.cond(
        plain,
        lambda: run(plain_draw, weights if frozen is None else frozen),
        lambda: run(full_draw, weights),
    )
    return result[0], result[1], result[2:]
