"""The oracle for generation: a naive loop over the stateful 1x1 Keras model itself.

It shares nothing with ``generation.Generator`` but the draw (``draw.draw_next``, which defines
what a draw at a position is): the model keeps its own recurrent state, one ``model(...)`` call
per character, Python control flow. The sampler and the export must match it byte for byte.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from charrnn_keras.draw import draw_next, seed_pair
from charrnn_keras.model import reset_states


def reference_generate(
    model, vocab, prime, num_chars, temperature=1.0, top_k=0, seed=0, strategy="sample"
) -> str:
    """Generates like ``charrnn sample``: unknown prime characters skipped, empty -> newline.

    Args:
        model: a 1x1 stateful model from ``build_model`` with the weights to use.
        vocab: its vocabulary.
        prime, num_chars, temperature, top_k, seed, strategy: as ``Sampler.generate`` takes.

    Returns:
        The generated text, without the prime.
    """
    ids = [vocab.index[c] for c in prime if c in vocab.index]
    if not ids:
        ids = [vocab.index["\n"] if "\n" in vocab.index else vocab.index[vocab.most_frequent()]]
    reset_states(model)
    for i in ids:
        logits = model(np.array([[i]], np.int32), training=False)[:, -1]
    out = []
    for position in range(num_chars):
        prev = vocab.chars[ids[-1]] if not out else out[-1]
        t = 0.0 if strategy == "words" and prev != " " else temperature
        drawn = draw_next(logits, tf.constant(t, tf.float32), tf.constant(top_k, tf.int32),
                          seed_pair(seed), position)  # fmt: skip
        out.append(vocab.chars[int(drawn[0])])
        logits = model(np.array([[int(drawn[0])]], np.int32), training=False)[:, -1]
    return "".join(out)
