"""Typed run configuration: dataclasses read from commented TOML, with dotted overrides.

A config file has three tables, ``[data]``, ``[model]`` and ``[train]``; any key left out keeps
its default. ``--set train.epochs=3`` overrides one key after the file is read, and is checked
against the field's type like the file itself.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from charrnn_keras.errors import ConfigError, option

CELLS = ("lstm", "gru", "rnn")
INITS = ("keras", "torch")  # model.init: initializers.py
MATMUL_DTYPES = ("float32", "bfloat16", "auto")
LSTM_LOOPS = ("auto", "onednn", "tensorflow")
DISTRIBUTE = ("none", "mirrored", "multi_worker")


@dataclass
class DataConfig:
    """How the corpus is cut into training batches.

    Args:
        batch_size: parallel streams per batch (rows).
        seq_length: characters per row per batch (time steps unrolled).
        val_fraction: the last fraction of the text held out for validation; 0 disables it.
        max_chars: cap on the built-in corpus (used only when no ``--data`` is given).
    """

    batch_size: int = 64
    seq_length: int = 64
    val_fraction: float = 0.05
    max_chars: int = 2_000_000


@dataclass
class ModelConfig:
    """The network: Embedding, ``num_layers`` recurrent layers, Dense logits.

    Args:
        cell: recurrent layer type, one of ``lstm``, ``gru``, ``rnn``.
        embedding_dim: size of the character embedding.
        rnn_size: units in each recurrent layer.
        num_layers: number of stacked recurrent layers.
        dropout: dropout rate after each recurrent layer during training (0 = none).
        fast_lstm: train LSTM layers with ``fast_lstm.FastLSTM``: the same layer, weights and
            results as ``keras.layers.LSTM``, with a training loop that is not slower (level on
            2 x 128, 1.05x on 2 x 512; BENCHMARKS.md, 1); GRU and SimpleRNN layers are not affected.
        matmul_dtype: ``float32``; ``bfloat16`` for training matmuls in bf16 (needs
            ``fast_lstm``; pays only on CPUs that multiply bf16 natively); or ``auto``: bf16
            on such a CPU, float32 elsewhere. Validation, sampling and the export always run
            float32; the run's run.json says which ran.
        chains: FastLSTM splits the batch rows into this many independent recurrences, which
            TensorFlow's inter-op threads run side by side (same results).
        time_chunks: FastLSTM does its large matmuls in this many blocks of time steps, so
            they overlap the recurrence on another thread (same results up to rounding).
        lstm_loop: FastLSTM's training loop: ``onednn``, oneDNN's fused LSTM op
            (``native_lstm.py``, built by ``make install``; ``chains`` and ``time_chunks``
            do not apply to it: it splits the batch by the thread pools, one op per inter-op
            thread when each op has one thread); ``tensorflow``, TensorFlow ops; ``auto``,
            the op where it is built, no GPU is visible and oneDNN has kernels for the
            matmul dtype (bf16 needs AVX-512), else TensorFlow ops.
        init: the recurrent and output layers' initialisers: ``keras`` (Glorot, orthogonal,
            forget-gate bias 1) or ``torch`` (PyTorch's uniform draws; ``initializers.py``).
    """

    cell: str = "lstm"
    embedding_dim: int = 64
    rnn_size: int = 128
    num_layers: int = 2
    dropout: float = 0.0
    fast_lstm: bool = True
    matmul_dtype: str = "float32"
    chains: int = 1
    time_chunks: int = 1
    lstm_loop: str = "auto"
    init: str = "keras"


@dataclass
class TrainConfig:
    """The optimisation and its callbacks.

    Args:
        epochs: passes over the training split.
        learning_rate: Adam's initial learning rate.
        lr_decay: per-epoch decay; epoch e uses ``learning_rate * lr_decay**e``.
        grad_clip: clip gradients to this global norm (0 = no clipping).
        epsilon: Adam's epsilon. Keras adds it to ``sqrt(v)`` before the bias correction, so
            early in training it acts as ``epsilon / sqrt(1 - beta_2**t)`` (31x at step 1):
            Keras's 1e-7 then damps every weight whose gradient is below ~3e-6: from
            PyTorch's initial weights, 2 x 512 layers trained far slower for hundreds of steps
            than PyTorch's Adam (same eps) did (BENCHMARKS.md, 2).
        weight_decay: decoupled weight decay (AdamW), per step ``learning_rate *
            weight_decay`` of every weight but biases (0 = none).
        ema: momentum of a moving average of the weights, updated every step (0 = none).
            Validation, checkpoints and samples use the average; training continues from
            the weights themselves.
        max_minutes: time budget; training stops cleanly, saved, when it runs out (0 = none).
        seed: seeds weight initialisation and dropout.
        checkpoint_every: save a named checkpoint every this many steps (0 = only the best).
        sample_chars: length of the sample shown after each epoch and at the end (0 = none).
        intra_op_threads: TensorFlow's threads within one op (0 = TensorFlow's default).
        inter_op_threads: TensorFlow's threads running independent ops (0 = the default).
        distribute: ``none`` (one device), ``mirrored`` (every local GPU, or ``replicas``
            CPU devices) or ``multi_worker`` (the machines in ``TF_CONFIG``); distribute.py.
        replicas: ``mirrored``: how many devices (0 = every GPU, or the CPU as one device).
    """

    epochs: int = 8
    learning_rate: float = 0.002
    lr_decay: float = 0.97
    grad_clip: float = 5.0
    epsilon: float = 1e-7
    weight_decay: float = 0.0
    ema: float = 0.0
    max_minutes: float = 0.0
    seed: int = 42
    checkpoint_every: int = 0
    sample_chars: int = 300
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    distribute: str = "none"
    replicas: int = 0


@dataclass
class Config:
    """A whole run's settings; the resolved copy is saved in every run directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """Returns the config as TOML that ``load_config`` reads back to an equal config."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _sections() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def _check_type(key: str, value, expected: type):
    """Returns ``value`` converted to ``expected`` or raises ConfigError naming ``key``."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if not ok:
        raise ConfigError(
            f"{key} must be {expected.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def _validate(cfg: Config) -> None:
    """Raises ConfigError for values no run can use."""
    positive = [
        ("data.batch_size", cfg.data.batch_size),
        ("data.seq_length", cfg.data.seq_length),
        ("data.max_chars", cfg.data.max_chars),
        ("model.embedding_dim", cfg.model.embedding_dim),
        ("model.rnn_size", cfg.model.rnn_size),
        ("model.num_layers", cfg.model.num_layers),
        ("model.chains", cfg.model.chains),
        ("model.time_chunks", cfg.model.time_chunks),
        ("train.epochs", cfg.train.epochs),
        ("train.learning_rate", cfg.train.learning_rate),
        ("train.lr_decay", cfg.train.lr_decay),
        ("train.epsilon", cfg.train.epsilon),
    ]
    for key, value in positive:
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{key} must be greater than 0, got {value!r}")
    non_negative = [
        ("train.grad_clip", cfg.train.grad_clip),
        ("train.weight_decay", cfg.train.weight_decay),
        ("train.max_minutes", cfg.train.max_minutes),
        ("train.checkpoint_every", cfg.train.checkpoint_every),
        ("train.sample_chars", cfg.train.sample_chars),
        ("train.intra_op_threads", cfg.train.intra_op_threads),
        ("train.inter_op_threads", cfg.train.inter_op_threads),
        ("train.replicas", cfg.train.replicas),
    ]
    for key, value in non_negative:
        if not value >= 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{key} must be 0 or more, got {value!r}")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction!r}")
    if not 0 <= cfg.train.ema < 1:
        raise ConfigError(f"train.ema must be in [0, 1), got {cfg.train.ema!r}")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout!r}")
    if not 0 <= cfg.train.seed < 2**32:  # what keras.utils.set_random_seed (numpy) accepts
        raise ConfigError(f"train.seed must be from 0 to {2**32 - 1}, got {cfg.train.seed!r}")
    if cfg.train.distribute not in DISTRIBUTE:
        raise ConfigError(
            f"train.distribute must be one of {', '.join(DISTRIBUTE)}, got {cfg.train.distribute!r}"
        )
    if cfg.train.replicas > 1 and cfg.train.distribute != "mirrored":
        raise ConfigError(
            f'train.replicas = {cfg.train.replicas} needs train.distribute = "mirrored", '
            f"got {cfg.train.distribute!r}"
        )
    m = cfg.model
    if m.init not in INITS:
        raise ConfigError(f"model.init must be one of {', '.join(INITS)}, got {m.init!r}")
    if m.cell not in CELLS:
        raise ConfigError(f"model.cell must be one of {', '.join(CELLS)}, got {m.cell!r}")
    if m.matmul_dtype not in MATMUL_DTYPES:
        raise ConfigError(
            f"model.matmul_dtype must be one of {', '.join(MATMUL_DTYPES)}, got {m.matmul_dtype!r}"
        )
    if m.lstm_loop not in LSTM_LOOPS:
        raise ConfigError(
            f"model.lstm_loop must be one of {', '.join(LSTM_LOOPS)}, got {m.lstm_loop!r}"
        )
    fast_only = {"matmul_dtype": m.matmul_dtype != "float32", "chains": m.chains != 1,
                 "time_chunks": m.time_chunks != 1,
                 "lstm_loop": m.lstm_loop == "onednn"}  # fmt: skip
    for key, changed in fast_only.items():
        if changed and not (m.fast_lstm and m.cell == "lstm"):
            raise ConfigError(
                f'model.{key} = {getattr(m, key)!r} needs model.cell = "lstm" and '
                f"model.fast_lstm = true (it is a FastLSTM setting), got cell {m.cell!r} and "
                f"fast_lstm {str(m.fast_lstm).lower()}; or leave {key} at its default"
            )


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Builds a validated Config from nested dicts, rejecting unknown sections and keys.

    Args:
        raw: ``{"data": {...}, "model": {...}, "train": {...}}``; missing keys keep defaults.
        source: where ``raw`` came from, for error messages.

    Returns:
        The validated Config.
    """
    sections = _sections()
    cfg = Config()
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(
                f"{source}: unknown section [{section}]; expected one of {', '.join(sections)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        target = getattr(cfg, section)
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in hints:
                known = ", ".join(f"{section}.{k}" for k in hints)
                raise ConfigError(f"{source}: unknown key {section}.{key}; known keys: {known}")
            setattr(target, key, _check_type(f"{section}.{key}", value, hints[key]))
    _validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, str, object]:
    """Splits ``section.key=value``; the value is read as TOML, or as a bare string.

    Returns:
        ``(section, key, value)``.
    """
    if "=" not in text:
        raise ConfigError(
            f"{option('overrides')} {text!r}: expected section.key=value, e.g. train.epochs=3"
        )
    dotted, value_text = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(
            f"{option('overrides')} {text!r}: the key must be section.key, e.g. train.epochs"
        )
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()  # so that `model.cell=gru` needs no quotes
    return parts[0], parts[1], value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Reads a TOML config file (or the defaults) and applies ``--set`` overrides.

    Args:
        path: a TOML file with ``[data]``, ``[model]``, ``[train]`` tables, or None for defaults.
        overrides: ``section.key=value`` strings, applied in order.

    Returns:
        The validated Config.
    """
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        except OSError as e:  # a folder, permissions: a read error, not a storage one
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        raw[section][key] = value
    return config_from_dict(raw, source)
