"""The generation settings and their limits: one table for the Python checks and the graph's.

This module imports no TensorFlow, so the CLI can take its choices and ranges before TensorFlow
starts. ``export_graph.graph_checks`` builds the graph asserts from the same ``LIMITS``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from charrnn_keras.errors import SamplingError

STRATEGIES = ("sample", "words")
# The generation step's products (lstm_step.FusedStep); the CLI offers all but "block".
KERNELS = ("auto", "matmul", "matvec", "block")
UNKNOWN = ("error", "skip")
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Limit:
    """The allowed range of one generation setting.

    Args:
        name: the setting (a keyword of ``Sampler.generate`` and an input of ``generate``).
        dtype: the dtype it becomes in the graph.
        low: the smallest value allowed.
        high: the largest value allowed, or the name of a bound known only at run time
            (``max_chars``, ``vocab_size``), or None for the dtype's largest value.
        rule: the rule as an error message states it; ``{high}`` is replaced by the bound.
    """

    name: str
    dtype: str
    low: float
    high: float | str | None
    rule: str

    def bound(self, bounds: dict) -> float:
        if isinstance(self.high, str):
            return bounds[self.high]
        if self.high is not None:
            return self.high
        info = np.finfo if "float" in self.dtype else np.iinfo
        return info(self.dtype).max

    def message(self, bounds: dict) -> str:
        return f"{self.name} must be {self.rule.format(high=self.bound(bounds))}"


LIMITS = (
    Limit("num_chars", "int32", 0, "max_chars", "from 0 to {high}"),
    Limit("temperature", "float32", 0.0, None, "a finite number, 0 or more (0 = most likely)"),
    Limit("top_k", "int32", 0, "vocab_size", "from 0 (all) to the vocabulary size {high}"),
    Limit("top_p", "float32", 0.0, 1.0, "a number from 0 to 1 (1 = all characters)"),
    Limit("seed", "int64", -(2**63), None, "an integer that fits in 64 bits"),
)


def check_settings(settings: dict, bounds: dict) -> None:
    """Raises SamplingError for a setting outside ``LIMITS`` (or of the wrong type).

    Args:
        settings: ``{name: value}`` for any of the settings in ``LIMITS``.
        bounds: the run-time bounds, ``{"max_chars": ..., "vocab_size": ...}``.
    """
    for limit in LIMITS:
        if limit.name not in settings:
            continue
        value = settings[limit.name]
        is_float = "float" in limit.dtype
        kind = numbers.Real if is_float else numbers.Integral
        ok = isinstance(value, kind) and not isinstance(value, bool)
        ok = ok and (not is_float or math.isfinite(value))
        if not ok or not limit.low <= value <= limit.bound(bounds):
            raise SamplingError(f"{limit.message(bounds)}, got {value!r}")
