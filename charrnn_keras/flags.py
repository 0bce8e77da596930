"""The ``charrnn`` command line: its subcommands, flags and their types.

Every number flag is checked against the dtype it becomes (``number``), and a usage error is one
line, as every other refusal of the CLI is. Which function runs a subcommand is ``cli``'s.
"""

from __future__ import annotations

import argparse
import math

from charrnn_keras.config import DISTRIBUTE
from charrnn_keras.limits import KERNELS, STRATEGIES, UNKNOWN
from charrnn_keras.serving.names import DEFAULT_MAX_CHARS


def _number(dtype: str, minimum: int | None = None, maximum: int | None = None):
    """An argparse ``type`` for a number that becomes ``dtype`` (int32, int64, float32).

    A value outside the dtype is refused here, as argparse refuses ``-n abc``, instead of
    wrapping or overflowing once it reaches numpy or the SavedModel.

    Args:
        dtype: ``int32``, ``int64`` or ``float32``.
        minimum: the smallest whole number allowed, if above the dtype's.
        maximum: the largest whole number allowed, if below the dtype's.

    Returns:
        The conversion function for ``add_argument(type=...)``.
    """
    from charrnn_keras.serving import names

    def convert(text: str):
        try:
            value = float(text) if dtype == "float32" else int(text)
        except ValueError:
            kind = "a number" if dtype == "float32" else "a whole number"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        if dtype == "float32":
            # NaN, inf and negatives are the library's to refuse (its message says why); only
            # finite values that float32 cannot hold are refused here.
            if math.isfinite(value) and abs(value) > names.FLOAT32_MAX:
                raise argparse.ArgumentTypeError(
                    f"must be at most {names.FLOAT32_MAX:.4g} in size (a float32), got {text}"
                )
            return value
        low, high = names.INT64_RANGE if dtype == "int64" else names.INT32_RANGE
        low = low if minimum is None else max(low, minimum)
        high = high if maximum is None else min(high, maximum)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high} ({dtype}), got {text}")
        return value

    convert.__name__ = dtype  # argparse names the type in some messages
    return convert


def _add_generation_flags(p, seed_default) -> None:
    p.add_argument(
        "--num-chars", "-n", type=_number("int32"), default=500, help="characters to generate"
    )
    p.add_argument(
        "--temperature",
        "-t",
        type=_number("float32"),
        default=1.0,
        help="divides the logits: lower is safer, higher is wilder; 0 = always the most likely",
    )
    p.add_argument(
        "--top-k",
        type=_number("int32"),
        default=0,
        help="draw only among the k most likely (0 = all)",
    )
    p.add_argument(
        "--top-p",
        type=_number("float32"),
        default=1.0,
        help="nucleus sampling: draw only among the most likely characters whose probabilities "
        "add up to P, after the temperature (1 = all)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="sample",
        help="sample: draw every character; words: draw at the start of a word, "
        "then the most likely character inside it",
    )
    p.add_argument(
        "--num-samples",
        "-N",
        type=_number("int32", 1),
        default=1,
        help="write N samples in one batched call, with seeds S, S+1, ... (each the text "
        "its seed gives alone)",
    )
    p.add_argument(
        "--seed",
        type=_number("int64"),
        default=seed_default,
        help="same seed, same text (the SavedModel seed [S, 0]); default %(default)s",
    )


class _Parser(argparse.ArgumentParser):
    """Reports a usage error in one line, as every other refusal is; --help is unchanged."""

    def error(self, message):
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_run_dir_flags(p) -> None:
    p.add_argument(
        "--run-dir",
        help="a run directory from charrnn train (default: the newest run of --config)",
    )
    p.add_argument(
        "--config",
        "-c",
        help="without --run-dir, use the newest runs/<config name>[-N] that charrnn train "
        "--config made (default: runs/default[-N])",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="charrnn",
        description="Character-level RNN language models: train, sample, export to TF Serving.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model; re-run the same command to resume")
    p.add_argument("--config", "-c", help="TOML config file (default: built-in defaults)")
    p.add_argument(
        "--data",
        "-d",
        help="UTF-8 text file or directory of them (default: Python's standard library source)",
    )
    p.add_argument(
        "--run-dir",
        help="where the run lives (default: runs/<config name>, or a new runs/<name>-N "
        "if that one has finished)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3 (repeatable)",
    )
    p.add_argument(
        "--distribute",
        choices=DISTRIBUTE,
        help="train.distribute: one device, every local GPU (or --replicas CPU devices), or "
        "the machines in TF_CONFIG (README: Training on several machines)",
    )
    p.add_argument(
        "--replicas",
        type=_number("int32", 0),
        help="train.replicas: devices for --distribute mirrored (0 = every GPU, or the CPU)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --run-dir")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(command="train")

    p = sub.add_parser("sample", help="write text with a trained run")
    _add_run_dir_flags(p)
    p.add_argument("--checkpoint", help="weights file (default: the best checkpoint)")
    p.add_argument(
        "--prime",
        "-p",
        default="",
        help="text to start from; empty starts from a newline if the vocabulary has one, "
        "else from its most frequent character",
    )
    _add_generation_flags(p, seed_default=0)
    p.add_argument(
        "--unknown",
        choices=UNKNOWN,
        default="error",
        help="prime characters missing from the vocabulary: error (default) or skip them",
    )
    _add_kernel_flag(p)
    p.set_defaults(command="sample")

    p = sub.add_parser("export", help="write a versioned SavedModel for TF Serving")
    _add_run_dir_flags(p)
    p.add_argument("--checkpoint", help="weights file (default: the best checkpoint)")
    p.add_argument("--export-dir", default="export", help="TF Serving base path")
    p.add_argument("--model-name", default="charrnn", help="model name (a folder in export-dir)")
    p.add_argument(
        "--version", type=_number("int64", 0), help="version number (default: next free)"
    )
    p.add_argument(
        "--max-chars",
        type=_number("int32", 0),
        default=DEFAULT_MAX_CHARS,
        help="cap on num_chars per request",
    )
    p.add_argument(
        "--batching_parameters_file",
        "--batching-parameters-file",
        help="TF Serving BatchingParameters text file: run generate in TensorFlow's "
        "BatchFunction op, which merges concurrent requests in any server",
    )
    _add_kernel_flag(p)
    p.set_defaults(command="export")

    p = sub.add_parser("serve", help="serve exported models over TF Serving's gRPC API")
    p.add_argument("--export-dir", default="export", help="TF Serving base path")
    p.add_argument("--model-name", default="charrnn")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    p.add_argument("--port", type=_number("int32", 0, 65535), default=8500)
    p.add_argument(
        "--rest-api-port",
        "--rest_api_port",
        type=_number("int32", 0, 65535),
        default=0,
        help="port of TF Serving's REST API (0 = off, TF Serving's default; its image uses 8501)",
    )
    p.add_argument(
        "--monitoring-config-file",
        "--monitoring_config_file",
        help="TF Serving MonitoringConfig text proto; 'prometheus_config { enable: true }' "
        "serves /monitoring/prometheus/metrics on the REST port",
    )
    p.add_argument(
        "--model_config_file",
        "--model-config-file",
        help="TF Serving ModelServerConfig text file (e.g. export/models.config): the model's "
        "base_path, model_version_policy and version_labels",
    )
    p.add_argument(
        "--tensorflow_intra_op_parallelism",
        "--tensorflow-intra-op-parallelism",
        type=_number("int32", 0),
        default=1,
        help="threads within one op (0 = one per core, TF Serving's default; 1 is faster "
        "for this model's small matmuls, see BENCHMARKS.md)",
    )
    p.add_argument(
        "--tensorflow_inter_op_parallelism",
        "--tensorflow-inter-op-parallelism",
        type=_number("int32", 0),
        default=0,
        help="threads running ops side by side (0 = one per core)",
    )
    p.set_defaults(command="serve")

    p = sub.add_parser("query", help="ask a TF Serving server for text")
    p.add_argument("--server", default="localhost:8500")
    p.add_argument("--model-name", default="charrnn")
    p.add_argument("--prime", "-p", default="")
    p.add_argument("--timeout", type=_number("float32"), default=30.0, help="seconds")
    _add_generation_flags(p, seed_default=0)
    p.set_defaults(command="query")
    return parser


def _add_kernel_flag(p) -> None:
    p.add_argument(
        "--kernel",
        choices=tuple(k for k in KERNELS if k != "block"),
        default="auto",
        help="the LSTM's products: auto (the fastest measured on this kind of CPU; sample and "
        "export choose alike), matmul (best on AVX-512 and AMX) or matvec (one "
        "matrix-vector product per row, best on AVX2 without AVX-512); BENCHMARKS.md 3",
    )
