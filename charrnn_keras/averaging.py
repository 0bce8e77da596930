"""The moving average of the weights (``train.ema``): Keras's optimizer keeps it (``use_ema``);
validation, checkpoints and samples see it in place of the weights, and training goes on from
the weights themselves.

Keras's ``SwapEMAWeights`` swaps by adding and subtracting, which is not exact in floating
point: every swap would move the weights training continues from by a rounding error, and a
run resumed from its backup would not be the run that was not interrupted. Here the swap copies.
"""

from __future__ import annotations

import contextlib

import keras


def averaged_pairs(model: keras.Model) -> list:
    """Returns the (weight, average) pairs of the model's optimizer; none without ``use_ema``."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not getattr(optimizer, "use_ema", False) or not optimizer.built:
        return []
    # The optimizer's own list: it is the order in which it keeps the averages.
    return list(zip(optimizer._trainable_variables, optimizer._model_variables_moving_average,
                    strict=True))  # fmt: skip


def swap(pairs) -> None:
    """Exchanges the values of each (weight, average) pair, bit for bit."""
    for weight, average in pairs:
        held = weight.numpy()  # a copy
        weight.assign(average.numpy())
        average.assign(held)


@contextlib.contextmanager
def averaged_weights(model: keras.Model):
    """Puts the optimizer's moving average of the weights in the model for the block.

    The weights are put back afterwards bit for bit. Without an average (``train.ema = 0``)
    it does nothing.

    Args:
        model: a compiled model.
    """
    pairs = averaged_pairs(model)
    swap(pairs)
    try:
        yield
    finally:
        swap(pairs)
