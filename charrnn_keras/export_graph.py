"""The export's side of a generation: settings checked in the graph, primes in, text out.

``generate_graph`` is what the exported ``generate`` runs on a batch of rows: UTF-8 primes
encoded by a lookup table, fed and drawn by ``generation.Generator``, decoded back to UTF-8.
``graph_checks`` builds ``limits.LIMITS`` as graph asserts (INVALID_ARGUMENT over gRPC) with
the messages of ``limits.check_settings``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from charrnn_keras.generation import Draw, Generator
from charrnn_keras.limits import LIMITS
from charrnn_keras.vocab import Vocab


def graph_checks(tensors: dict, bounds: dict) -> list:
    """Returns assert ops for ``limits.LIMITS``, with the messages of ``check_settings``.

    Args:
        tensors: ``{name: tensor}`` (scalars or one value per row).
        bounds: the bounds, fixed when the graph is built.

    Returns:
        Ops to run before the generation (``tf.control_dependencies``).
    """
    checks = []
    for limit in LIMITS:
        value = tensors.get(limit.name)
        if value is None or limit.dtype == "int64":  # an int64 input cannot be out of range
            continue
        high = tf.constant(limit.bound(bounds), value.dtype)
        ok = (value >= tf.constant(limit.low, value.dtype)) & (value <= high)
        if value.dtype.is_floating:
            ok &= tf.math.is_finite(value)
        checks.append(
            tf.debugging.Assert(tf.reduce_all(ok), [f"{limit.message(bounds)}, got", value])
        )
    return checks


def prime_table(vocab: Vocab) -> tf.lookup.StaticHashTable:
    """A code point -> id table; unknown code points map to -1."""
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(vocab.codepoints.astype(np.int64)), tf.range(len(vocab), dtype=tf.int64)
        ),
        default_value=-1,
    )


def encode_primes(table, primes, fallback_id: int):
    """Encodes UTF-8 primes in the graph, as ``prepare_prime(unknown="skip")`` does.

    Returns:
        ``(ids [batch, time] int32 padded, lengths [batch] int32)``; every length is at least 1.
    """
    cps = tf.strings.unicode_decode(primes, "UTF-8", errors="ignore")
    ids = tf.ragged.map_flat_values(table.lookup, tf.cast(cps, tf.int64))
    ids = tf.ragged.boolean_mask(ids, ids >= 0)
    lengths = tf.cast(ids.row_lengths(), tf.int32)
    # One padding column, so that the first column exists even when every prime is empty.
    dense = tf.pad(tf.cast(ids.to_tensor(0), tf.int32), [[0, 0], [0, 1]])
    first = tf.where(lengths == 0, fallback_id, dense[:, 0])
    return tf.concat([first[:, None], dense[:, 1:]], axis=1), tf.maximum(lengths, 1)


def decode_ids(vocab: Vocab, ids):
    """Returns UTF-8 strings ``[batch]`` for id rows ``[batch, n]`` (dense or ragged)."""
    cps = tf.gather(tf.constant(vocab.codepoints.astype(np.int32)), ids)
    return tf.strings.unicode_encode(cps, "UTF-8")


def generate_graph(gen: Generator, table, primes, num_chars, settings: Draw):
    """A whole generation for a batch of primes, in one graph (what the export serves).

    Every row is independent: its own prime, length, settings and seed, so a row's text is
    the same in any batch. The loop runs to the longest row; shorter rows' extra characters
    are dropped.

    Args:
        gen: the Generator.
        table: from ``prime_table(gen.vocab)``.
        primes: string ``[batch]``.
        num_chars: int32 ``[batch]``.
        settings: the rows' draw settings (seed ``[batch, 2]``).

    Returns:
        string ``[batch]``: the continuations.
    """
    ids, lengths = encode_primes(table, primes, gen.vocab.index[gen.fallback])
    batch = tf.shape(ids)[0]
    states = gen.feed(ids, lengths - 1, gen.zero_states(batch))
    prev = tf.gather(ids, lengths - 1, batch_dims=1)
    count = tf.reduce_max(tf.concat([num_chars, [0]], axis=0))
    out, _, _ = gen.draw(prev, states, count, settings, tf.constant(0, tf.int64))
    return decode_ids(gen.vocab, tf.RaggedTensor.from_tensor(out, lengths=num_chars))
