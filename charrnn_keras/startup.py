"""Process start-up for the CLI: our log format, and TensorFlow loaded without its start-up lines.

Every ``charrnn`` command's output is ours alone: TensorFlow's, absl's and Keras's notes speak to
their own developers, so they are shown only with ``-v`` (or TensorFlow's own variables asking
for them).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile


def configure_logging(verbose: bool) -> None:
    """Our log lines on stderr; library notes only with ``verbose``."""
    _quiet_tensorflow(verbose)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.captureWarnings(True)
    if not verbose:
        for name in ("absl", "tensorflow", "py.warnings"):
            logging.getLogger(name).setLevel(logging.ERROR)


def load_tensorflow(verbose: bool) -> None:
    """Imports TensorFlow quietly, unless its start-up lines were asked for."""
    if not _wants_tensorflow_startup(verbose):
        _load_tensorflow()


def _quiet_tensorflow(verbose: bool) -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if not verbose:
        # TensorFlow applies it only once loaded; _load_tensorflow handles its start-up lines.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _wants_tensorflow_startup(verbose: bool) -> bool:
    """-v, or TensorFlow's own variables asking for its INFO or VLOG lines, shows its start-up."""
    env = os.environ
    return (
        verbose
        or env.get("TF_CPP_MIN_LOG_LEVEL") == "0"
        or "TF_CPP_MAX_VLOG_LEVEL" in env
        or "TF_CPP_VMODULE" in env
    )


def _load_tensorflow() -> None:
    """Imports TensorFlow and lists its devices with stderr's file descriptor pointed away.

    Why at the descriptor: TensorFlow 2.21 logs through Abseil from C++ static initialisers while
    its shared libraries load. The oneDNN notice (core/util/port.cc, reached from
    threadpool_device.cc's initialiser) and "Could not find cuda drivers" (tsl/cuda/cudart_stub.cc,
    reached from the CUDA kernels' fat-binary constructor) run before the same library's
    logging_initializer.cc applies TF_CPP_MIN_LOG_LEVEL, and nothing calls
    absl::InitializeLog(), so Abseil writes them whatever the level, after its "All log messages
    before absl::InitializeLog()" warning. libtensorflow_framework.so.2 and
    python/profiler/internal/_pywrap_profiler_plugin.so each link their own copy of Abseil and of
    these initialisers, and `import tensorflow` loads both: hence everything twice. No variable
    reaches them (TF_ENABLE_ONEDNN_OPTS=0 silences the notice only by turning oneDNN off, and a
    CPU-only TensorFlow still prints it). Listing the devices here keeps a machine without a CUDA
    driver's "failed call to cuInit" error (logged when TensorFlow first looks for GPUs) in the
    same window. What was written is dropped, unless loading fails: then it may say why.
    """
    if "tensorflow" in sys.modules or sys.stderr is None:  # None: run with stderr closed
        return
    sys.stderr.flush()
    real_stderr = os.dup(2)
    with tempfile.TemporaryFile() as held:  # a file, not a pipe: nothing can block on it
        loaded = False
        try:
            os.dup2(held.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices()
            loaded = True
        finally:
            sys.stderr.flush()
            os.dup2(real_stderr, 2)
            os.close(real_stderr)
            if not loaded:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))
