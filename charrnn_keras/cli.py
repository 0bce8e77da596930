"""The ``charrnn`` command: train, sample, export, serve, query.

This is the only module that prints. Errors a user can fix (``CharRNNError``) are shown as one
line on stderr with exit status 2; library modules log through ``logging``.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import sys
import threading
from pathlib import Path

from charrnn_keras import flags, startup
from charrnn_keras.atomic import storage_error
from charrnn_keras.errors import CharRNNError, StorageError
from charrnn_keras.limits import INT32_MAX

# A full disk, a quota, a read-only or forbidden folder: the user's to fix, not a bug.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def cmd_train(args) -> int:
    from charrnn_keras import corpus as corpus_lib
    from charrnn_keras.config import load_config

    # Checked before TensorFlow loads (seconds), so these refusals are immediate.
    overrides = list(args.set or ())
    if args.distribute is not None:
        overrides.append(f'train.distribute="{args.distribute}"')
    if args.replicas is not None:
        overrides.append(f"train.replicas={args.replicas}")
    cfg = load_config(args.config, overrides)
    if cfg.train.distribute == "multi_worker" and os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "2":
        # When a worker dies, the others' collectives log their aborts as ERROR lines before
        # our one-line error says the same; TensorFlow reads the level when it loads (-v:
        # startup.py leaves the level alone).
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    corpus_lib.check_data_path(args.data)
    from charrnn_keras.train import train

    _imports_done()
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
    from charrnn_keras import checkpoints, rundir

    run_dir = _run_dir(args)
    _, vocab = rundir.load_run(run_dir)
    checkpoints.find_checkpoint(run_dir, args.checkpoint)
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

    _imports_done()
    # One character at a time is a chain of small ops: a second intra-op thread costs more to
    # wake than it saves (2 x 512: 1.5x to 1.8x the characters/s with one; BENCHMARKS.md, 3).
    startup.pin_threads(1, 0)
    sampler = Sampler.from_run_dir(run_dir, args.checkpoint, args.kernel)
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

    _imports_done()
    path = export_run(
        run_dir,
        export_dir=args.export_dir,
        model_name=args.model_name,
        version=args.version,
        checkpoint=args.checkpoint,
        max_chars=args.max_chars,
        batching_parameters_file=args.batching_parameters_file,
        kernel=args.kernel,
    )
    print(f"exported SavedModel: {path}")
    return 0


def cmd_serve(args) -> int:
    from charrnn_keras.serving.server import serve

    _imports_done()
    serve(
        args.export_dir,
        args.model_name,
        host=args.host,
        port=args.port,
        rest_api_port=args.rest_api_port or None,  # 0 is off, as in tensorflow_model_server
        monitoring_config_file=args.monitoring_config_file,
        model_config_file=args.model_config_file,
        intra_op_threads=args.tensorflow_intra_op_parallelism,
        inter_op_threads=args.tensorflow_inter_op_parallelism,
    )
    return 0


def cmd_query(args) -> int:
    from charrnn_keras.serving.client import Client

    _imports_done()
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


_FLAGS = {"overrides": "--set"}


def flag(name: str, value: str | None) -> str:
    """Spells a library parameter named in an error message as this CLI's flag."""
    flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
    return flag if value in (None, "True") else f"{flag} {value}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "export": cmd_export, "serve": cmd_serve,
            "query": cmd_query}  # fmt: skip


def build_parser():
    """The argument parser (``flags.build_parser``)."""
    return flags.build_parser()


def _pause_gc() -> None:
    """Turns the cyclic GC off while TensorFlow and Keras load (``_imports_done`` turns it on).

    Importing them makes about half a million objects, and every collection of the oldest
    generation walks all of them again: 0.4 to 1 s of a ``charrnn sample``'s start-up on a
    2-core machine (BENCHMARKS.md, "Start-up"). Only for the process's own command: a caller
    of ``main(argv)`` keeps its collector as it was.
    """
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def _imports_done() -> None:
    """Moves what the imports made to the permanent generation and turns the GC back on.

    Frozen, those objects are never walked again, so later collections (say, while a graph
    traces) cost what the command itself allocates; the few cycles the imports left are kept.
    """
    global _gc_paused
    if _gc_paused:
        gc.freeze()
        gc.enable()
        _gc_paused = False


_gc_paused = False


def main(argv=None) -> int:
    if argv is None:  # the process's command (the console script), not a caller's
        _pause_gc()
    try:
        return _main(argv)
    finally:
        _imports_done()  # a command that ended before its imports


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # A scheduler's `kill` stops training as cleanly as Ctrl-C does.
        signal.signal(signal.SIGTERM, _interrupt)
    startup.configure_logging(args.verbose)
    try:
        startup.load_tensorflow(args.verbose)
        return COMMANDS[args.command](args)
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
