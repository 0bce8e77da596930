"""Will it fit: the weights and training memory of a config, known before anything is built.

``session`` calls ``check_fits`` before it makes the run directory, so a model this machine
cannot train is refused in one line, with nothing half made.
"""

from __future__ import annotations

import os
from pathlib import Path

from charrnn_keras.config import Config, ModelConfig
from charrnn_keras.errors import ConfigError

# Deeper stacks add nothing a char-RNN can use and take minutes to build (100,000 layers did).
MAX_LAYERS = 64
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def estimate_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Returns the number of weights ``build_model`` creates, without building anything.

    Args:
        cfg: the model settings.
        vocab_size: number of distinct characters.

    Returns:
        The exact parameter count (``model.count_params()`` of the built model).
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got vocab_size={vocab_size}")
    units, gates = cfg.rnn_size, _GATES[cfg.cell]
    # Keras' GRU (reset_after=True) has two bias vectors; LSTM and SimpleRNN one.
    biases = 2 if cfg.cell == "gru" else 1
    total = vocab_size * cfg.embedding_dim + units * vocab_size + vocab_size
    inputs = cfg.embedding_dim
    for _ in range(cfg.num_layers):
        total += gates * units * (inputs + units + biases)
        inputs = units
    return total


def estimate_memory(cfg: Config, vocab_size: int) -> int:
    """Returns a rough estimate of the memory training needs, in bytes.

    Float32 weights, their gradients and Adam's two slots (16 bytes per weight), plus the
    activations kept for backpropagation over one ``batch_size x seq_length`` batch and their
    gradients: the embedding, each layer's gates, cell and output, and the logits with their
    softmax. TensorFlow's own overhead is not included, so the truth is somewhat higher.

    Args:
        cfg: the run's settings (model size and batch shape).
        vocab_size: number of distinct characters.

    Returns:
        Bytes.
    """
    m, d = cfg.model, cfg.data
    weights = 16 * estimate_params(m, vocab_size)
    per_char = m.embedding_dim + m.num_layers * (_GATES[m.cell] + 3) * m.rnn_size + 3 * vocab_size
    activations = 2 * 4 * d.batch_size * d.seq_length * per_char
    return weights + activations


def machine_memory() -> int | None:
    """Returns the memory this process may use: physical memory, or a lower cgroup limit.

    Returns:
        Bytes, or None where the system does not say.
    """
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not POSIX
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))  # "max", or a huge number, when there is no limit
    return min(limits) if limits else None


def check_fits(cfg: Config, vocab_size: int, memory: int | None = None) -> None:
    """Refuses, before anything is built or written, a model this machine cannot train.

    Args:
        cfg: the run's settings.
        vocab_size: number of distinct characters of the corpus.
        memory: bytes available; default ``machine_memory()``.

    Raises:
        ConfigError: one line with the estimate and the settings to lower.
    """
    m, d = cfg.model, cfg.data
    if m.num_layers > MAX_LAYERS:
        raise ConfigError(
            f"model.num_layers = {m.num_layers} is more than {MAX_LAYERS}: such a stack takes "
            f"minutes to build and does not train; lower model.num_layers (2 or 3 is usual)"
        )
    memory = machine_memory() if memory is None else memory
    if memory is None:
        return
    params = estimate_params(m, vocab_size)
    need = estimate_memory(cfg, vocab_size)
    if need <= memory:
        return
    if 16 * params >= need / 2:
        lower = "model.rnn_size or model.num_layers"
    else:
        lower = "data.batch_size or data.seq_length (or model.rnn_size)"
    raise ConfigError(
        f"the model does not fit in memory: {params:,} weights (model.rnn_size = {m.rnn_size}, "
        f"model.num_layers = {m.num_layers}) need about {_gib(need)} to train with "
        f"data.batch_size = {d.batch_size} x data.seq_length = {d.seq_length}, and this "
        f"machine has {_gib(memory)}; lower {lower}"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"
