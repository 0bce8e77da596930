"""Names shared by the export, the server and the client: signatures, tensors, directories.

Everything a client must spell the same way as the SavedModel lives here, so that renaming a
signature input cannot silently break the client. This module imports nothing heavy (no
TensorFlow), so the client and the server's directory scanning stay cheap to import.
"""

from __future__ import annotations

import re
from pathlib import Path

from charrnn_keras.errors import ServingError

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
MODELS_CONFIG = "models.config"

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


def is_version_name(name: str) -> bool:
    """True for the folder names TF Serving treats as versions: all ASCII digits."""
    return name.isascii() and name.isdigit()


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
