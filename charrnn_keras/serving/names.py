"""Names shared by the export, the server and the client: signatures, tensors, directories.

Everything a client must spell the same way as the SavedModel lives here, so that renaming a
signature input cannot silently break the client. This module imports nothing heavy (no
TensorFlow), so the client and the server's directory scanning stay cheap to import.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from charrnn_keras.errors import ServingError, option

# Signatures (all with method name tensorflow/serving/predict).
GENERATE = "generate"
STEP = "step"
METADATA = "metadata"
SERVING_DEFAULT = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
SERVE_TAG = "serve"

# generate: inputs.
PRIME = "prime"
NUM_CHARS = "num_chars"
TEMPERATURE = "temperature"
TOP_K = "top_k"
TOP_P = "top_p"
SEED = "seed"
STRATEGY = "strategy"
# generate: output.
TEXT = "text"
# generate: output of exports batched in the graph (--batching_parameters_file): the rows of the
# batch each row ran in, padding included; > 1 shows that TensorFlow merged requests.
BATCH_SIZE = "batch_size"

# step: inputs char_ids plus one input per state tensor (named as generation.state_layout gives,
# e.g. lstm_1_h, lstm_1_c); outputs logits plus the new states under the same names, so that a
# client feeds the outputs straight back as the next inputs.
CHAR_IDS = "char_ids"
LOGITS = "logits"

# metadata: outputs.
CHARS = "chars"
CODEPOINTS = "codepoints"
STATE_NAMES = "state_names"
CELL = "cell"
NUM_LAYERS = "num_layers"
RNN_SIZE = "rnn_size"
EMBEDDING_DIM = "embedding_dim"
VOCAB_SIZE = "vocab_size"
MAX_CHARS = "max_chars"
MAX_BATCH_CHARS = "max_batch_chars"
MAX_ROWS = "max_rows"
SIGNATURE_VERSION = "signature_version"
FALLBACK_PRIME = "fallback_prime"
CONFIG_TOML = "config_toml"

DEFAULT_MAX_CHARS = 10_000
# The generate signature's version, in metadata: 2 has one value per row for every input
# (version 1 took scalar settings and one seed for the whole batch).
GENERATE_VERSION = 2
# 64 rows of 10,000 characters fit, with room for their primes. 1,024 rows of a 2 x 512 model
# hold about 25 MiB of state and gate activations.
DEFAULT_MAX_BATCH_CHARS = 1_000_000
DEFAULT_MAX_ROWS = 1024

# The ranges of the signature dtypes that numbers given to the export, the client and the CLI
# become: a value outside them would wrap (numpy) or fail only once served.
INT32_RANGE = (-(2**31), 2**31 - 1)
INT64_RANGE = (-(2**63), 2**63 - 1)
FLOAT32_MAX = 3.4028234663852886e38
MODELS_CONFIG = "models.config"
# TF Serving replays these PredictionLog records before it reports a version AVAILABLE.
WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_model_name(name: str) -> str:
    """Returns ``name`` if it can be a model folder and a TF Serving model name, else raises.

    Args:
        name: the model name, e.g. ``charrnn``.

    Returns:
        The same name.
    """
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ServingError(
            f"model name {name!r} is not usable: use letters, digits, '_', '-' and '.', "
            f"starting with a letter or digit (e.g. charrnn)"
        )
    return name


def check_int(name: str, value, dtype: str = "int32", minimum: int | None = None) -> int:
    """Returns ``value`` as an int if it fits the signature dtype (and ``minimum``), else raises.

    Args:
        name: the parameter, named in the message (e.g. ``num_chars``).
        value: the number given.
        dtype: ``int32`` or ``int64``, what the value becomes.
        minimum: the smallest value allowed, if above the dtype's.

    Returns:
        The value as a Python int.
    """
    low, high = INT64_RANGE if dtype == "int64" else INT32_RANGE
    if minimum is not None:
        low = max(low, minimum)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ServingError(f"{option(name)} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ServingError(f"{option(name)} must be from {low} to {high} ({dtype}), got {value}")
    return int(value)


def check_float32(name: str, value) -> float:
    """Returns ``value`` as a float if it is finite as a float32, else raises.

    Args:
        name: the parameter, named in the message (e.g. ``temperature``).
        value: the number given.

    Returns:
        The value as a Python float.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ServingError(f"{option(name)} must be a number, got {value!r}") from None
    if not (math.isfinite(number) and abs(number) <= FLOAT32_MAX):
        raise ServingError(
            f"{option(name)} must be a finite number (a float32, at most {FLOAT32_MAX:.4g} in "
            f"size), got {value}"
        )
    return number


def is_version_name(name: str) -> bool:
    """True for the folder names TF Serving treats as versions: digits that fit an int64.

    TF Serving parses version folders with ``absl::SimpleAtoi`` into an int64 and ignores the
    ones that do not parse; serving a larger one would fail every request (issue 15, item 5).
    """
    return name.isascii() and name.isdigit() and int(name) <= INT64_RANGE[1]


def list_versions(model_dir: str | Path, complete_only: bool = True) -> list[int]:
    """Returns the versions under ``export/<model>/``, lowest first.

    Args:
        model_dir: the model's base path (``export/<model-name>``).
        complete_only: count only folders holding a ``saved_model.pb``.

    Returns:
        Version numbers; [] when the folder does not exist.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    found = []
    for child in model_dir.iterdir():
        if not (is_version_name(child.name) and child.is_dir()):
            continue
        if complete_only and not (child / "saved_model.pb").exists():
            continue
        found.append(int(child.name))
    return sorted(found)
