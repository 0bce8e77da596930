"""PyTorch's initialisers for the recurrent and output layers (``model.init = "torch"``).

``torch.nn.LSTM`` (and GRU, RNN) draws every weight uniform in ``+-1/sqrt(units)`` and has two
biases, ``b_ih + b_hh``, each drawn that way; ``nn.Linear`` draws weight and bias uniform in
``+-1/sqrt(fan_in)``. Keras draws Glorot-uniform kernels, orthogonal recurrent kernels, zero
biases and a forget-gate bias of 1. ``bench/parity.py`` starts ours from a PyTorch model's own
draw; on tinyshakespeare in 30 minutes neither draw beat the other clearly (BENCHMARKS.md, 2).
"""

from __future__ import annotations

import math

import keras


class SumOfUniforms(keras.initializers.Initializer):
    """The sum of ``count`` independent draws uniform in ``[-bound, bound]``: torch's
    ``b_ih + b_hh`` as one bias.

    Args:
        bound: the half-width of each draw.
        count: how many draws are summed.
    """

    def __init__(self, bound: float, count: int = 2):
        if not bound > 0:
            raise ValueError(f"bound must be greater than 0, received: bound={bound}")
        if count < 1:
            raise ValueError(f"count must be at least 1, received: count={count}")
        self.bound, self.count = bound, count

    def __call__(self, shape, dtype=None):
        draws = keras.random.uniform((self.count, *shape), -self.bound, self.bound, dtype=dtype)
        return keras.ops.sum(draws, axis=0)

    def get_config(self):
        return {"bound": self.bound, "count": self.count}


def recurrent(init: str, units: int, cell: str) -> dict:
    """Keyword arguments for a recurrent layer of ``units`` units under ``init``.

    Args:
        init: ``keras`` (the layer's own defaults) or ``torch``.
        units: the layer's units.
        cell: ``lstm``, ``gru`` or ``rnn``.

    Returns:
        Initialiser arguments for the Keras layer (none for ``keras``).
    """
    if init == "keras":
        return {}
    bound = 1 / math.sqrt(units)
    # One initialiser per variable: Keras fixes an unseeded one's seed when it is made, so a
    # shared one would give two variables of the same shape the same values.
    out = {"kernel_initializer": keras.initializers.RandomUniform(-bound, bound),
           "recurrent_initializer": keras.initializers.RandomUniform(-bound, bound),
           "bias_initializer": SumOfUniforms(bound)}  # fmt: skip
    if cell == "lstm":
        out["unit_forget_bias"] = False
    return out


def dense(init: str, fan_in: int) -> dict:
    """Keyword arguments for the logits layer (inputs of width ``fan_in``) under ``init``."""
    if init == "keras":
        return {}
    bound = 1 / math.sqrt(fan_in)
    return {"kernel_initializer": keras.initializers.RandomUniform(-bound, bound),
            "bias_initializer": keras.initializers.RandomUniform(-bound, bound)}  # fmt: skip
