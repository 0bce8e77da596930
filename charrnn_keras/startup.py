"""Process start-up for the CLI: our log format, TensorFlow loaded without its start-up lines,
and its thread pools set before it starts.

Every ``charrnn`` command's output is ours alone: TensorFlow's, absl's and Keras's notes speak to
their own developers, so they are shown only with ``-v`` (or TensorFlow's own variables asking
for them).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import tempfile

log = logging.getLogger(__name__)


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
    """Makes the first ``import tensorflow`` quiet, unless its start-up lines were asked for.

    TensorFlow is not imported here: a command that refuses its input before it needs
    TensorFlow (a bad flag, config or data path) answers at once, and the import, whenever
    something makes it, runs with stderr held (``_load_tensorflow``).
    """
    if _wants_tensorflow_startup(verbose) or "tensorflow" in sys.modules:
        return
    if not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` for the import system with a loader that holds stderr (once)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _HeldLoader(spec.loader)
        return spec


class _HeldLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader inside ``_stderr_held``, then lists the devices there too."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with _stderr_held():
            self.loader.exec_module(module)
            module.config.list_physical_devices()


def pin_threads(intra_op_threads: int, inter_op_threads: int) -> bool:
    """Sets the process's intra- and inter-op threads, if TensorFlow has not started yet.

    Args:
        intra_op_threads: threads within one op (0: one per core).
        inter_op_threads: threads running independent ops (0: one per core).

    Returns:
        Whether they were set: False once the process has run TensorFlow (e.g. a server
        started inside a test), whose pools then stay as they are.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    except RuntimeError:
        log.debug("TensorFlow already started; its thread pools stay as they are")
        return False
    return True


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


@contextlib.contextmanager
def _stderr_held():
    """Points stderr's file descriptor away while TensorFlow loads and lists its devices.

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
    CPU-only TensorFlow still prints it). Listing the devices inside keeps a machine without a
    CUDA driver's "failed call to cuInit" error (logged when TensorFlow first looks for GPUs) in
    the same window. What was written is dropped, unless loading fails: then it may say why.
    """
    if sys.stderr is None:  # run with stderr closed: nothing to hold
        yield
        return
    sys.stderr.flush()
    real_stderr = os.dup(2)
    with tempfile.TemporaryFile() as held:  # a file, not a pipe: nothing can block on it
        loaded = False
        try:
            os.dup2(held.fileno(), 2)
            yield
            loaded = True
        finally:
            sys.stderr.flush()
            os.dup2(real_stderr, 2)
            os.close(real_stderr)
            if not loaded:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))
