"""The ``charrnn`` command: train, sample, export, serve, query.

This is the only module that prints. Errors a user can fix (``CharRNNError``) are shown as one
line on stderr with exit status 2; library modules log through ``logging``.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys
import threading
from pathlib import Path

from charrnn_keras import startup
from charrnn_keras.atomic import storage_error
from charrnn_keras.errors import CharRNNError, StorageError
from charrnn_keras.limits import INT32_MAX, STRATEGIES, UNKNOWN
from charrnn_keras.serving.names import DEFAULT_MAX_CHARS

# A full disk, a quota, a read-only or forbidden folder: the user's to fix, not a bug.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def cmd_train(args) -> int:
    from charrnn_keras import data as data_lib
    from charrnn_keras.config import load_config

    # Checked before TensorFlow loads (seconds), so these refusals are immediate.
    cfg = load_config(args.config, args.set or ())
    data_lib.check_data_path(args.data)
    from charrnn_keras.train import train

    result = train(
        cfg,
        data=args.data,
        run_dir=args.run_dir,
        overwrite=args.overwrite,
        config_name=_config_name(args.config),
        # A progress bar redrawn in place is for a terminal; a log file gets a line per epoch.
        verbose=0 if args.quiet else 1 if sys.stdout.isatty() else 2,
    )
    print(f"run directory: {result.run_dir}")
    if result.best_val_loss is not None:
        which = "validation" if cfg.data.val_fraction > 0 else "training"
        print(
            f"best {which} loss: {result.best_val_loss:.4f} nats/char "
            f"({result.best_val_bpc:.4f} bits/char)"
        )
    if result.sample:
        print("sample:")
        print(result.sample)
    if result.stopped_early:
        print(result.stopped_early)
    return 0


def _config_name(path) -> str:
    return Path(path).stem if path else "default"


def _run_dir(args) -> Path:
    """--run-dir, else the newest run that `charrnn train --config CONFIG` made."""
    from charrnn_keras.rundir import newest_run

    return Path(args.run_dir) if args.run_dir else newest_run(_config_name(args.config))


def _checked_run(args) -> tuple[Path, object]:
    """The run directory to use and its vocabulary, checked before TensorFlow loads."""
    from charrnn_keras import rundir

    run_dir = _run_dir(args)
    _, vocab = rundir.load_run(run_dir)
    rundir.find_checkpoint(run_dir, args.checkpoint)
    return run_dir, vocab


def cmd_sample(args) -> int:
    from charrnn_keras.limits import check_settings

    run_dir, vocab = _checked_run(args)
    check_settings(
        dict(num_chars=args.num_chars, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, seed=args.seed),
        {"max_chars": INT32_MAX, "vocab_size": len(vocab)},
    )  # fmt: skip
    from charrnn_keras.sampling import Sampler

    sampler = Sampler.from_run_dir(run_dir, args.checkpoint)
    prime = sampler.prepare_prime(args.prime, unknown=args.unknown)
    settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    strategy=args.strategy)  # fmt: skip
    if args.num_samples != 1:
        texts = sampler.samples(prime, args.num_chars, args.num_samples, args.seed, **settings)
        _print_samples(prime, texts, args.seed)
        return 0
    # generate() checks the settings when called, so a bad one is reported before any output.
    chars = sampler.generate(prime, num_chars=args.num_chars, seed=args.seed, **settings)
    sys.stdout.write(prime)
    for char in chars:
        sys.stdout.write(char)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _print_samples(prime: str, texts: list[str], seed: int) -> None:
    """Prints numbered samples, each headed by the seed that reproduces it alone."""
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1} (--seed {seed + i})")
        print(prime + text)


def cmd_export(args) -> int:
    run_dir, _ = _checked_run(args)
    from charrnn_keras.export import export_run

    path = export_run(
        run_dir,
        export_dir=args.export_dir,
        model_name=args.model_name,
        version=args.version,
        checkpoint=args.checkpoint,
        max_chars=args.max_chars,
        batching_parameters_file=args.batching_parameters_file,
    )
    print(f"exported SavedModel: {path}")
    return 0


def cmd_serve(args) -> int:
    from charrnn_keras.serving.server import serve

    serve(
        args.export_dir,
        args.model_name,
        host=args.host,
        port=args.port,
        rest_api_port=args.rest_api_port or None,  # 0 is off, as in tensorflow_model_server
        monitoring_config_file=args.monitoring_config_file,
        model_config_file=args.model_config_file,
    )
    return 0


def cmd_query(args) -> int:
    from charrnn_keras.serving.client import Client

    n = args.num_samples
    with Client(args.server, args.model_name, timeout=args.timeout) as client:
        texts = client.generate(
            [args.prime] * n,
            num_chars=args.num_chars,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            strategy=args.strategy,
            seed=[args.seed + i for i in range(n)],
        )
    if n == 1:
        print(args.prime + texts[0])
    else:
        _print_samples(args.prime, texts, args.seed)
    return 0


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
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --run-dir")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

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
    p.set_defaults(func=cmd_sample)

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
    p.set_defaults(func=cmd_export)

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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("query", help="ask a TF Serving server for text")
    p.add_argument("--server", default="localhost:8500")
    p.add_argument("--model-name", default="charrnn")
    p.add_argument("--prime", "-p", default="")
    p.add_argument("--timeout", type=_number("float32"), default=30.0, help="seconds")
    _add_generation_flags(p, seed_default=0)
    p.set_defaults(func=cmd_query)
    return parser


# Library parameters whose flag is not simply --name-with-dashes.
_FLAGS = {"overrides": "--set"}


def flag(name: str, value: str | None) -> str:
    """Spells a library parameter named in an error message as this CLI's flag."""
    flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
    return flag if value in (None, "True") else f"{flag} {value}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # A scheduler's `kill` stops training as cleanly as Ctrl-C does.
        signal.signal(signal.SIGTERM, _interrupt)
    startup.configure_logging(args.verbose)
    try:
        startup.load_tensorflow(args.verbose)
        return args.func(args)
    except CharRNNError as e:
        message = " ".join(e.render(flag).split())  # one line, whatever the message held
        print(f"charrnn {args.command}: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"charrnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `charrnn sample | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except OSError as e:  # a write that no library code turned into a StorageError
        if e.errno not in _STORAGE_ERRNOS or not isinstance(e.filename, (str, os.PathLike)):
            raise
        print(f"charrnn {args.command}: error: {storage_error(e, e.filename)}", file=sys.stderr)
        return StorageError.exit_code


if __name__ == "__main__":
    sys.exit(main())
