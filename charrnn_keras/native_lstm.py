"""oneDNN's fused LSTM primitive as a TensorFlow op, for training on a CPU.

PyTorch trains its LSTMs on a CPU with oneDNN's LSTM primitive: one call runs the whole sequence
(forward, and backward with the weight gradients), with no per-step graph ops at all. TensorFlow
has no such op, and its own oneDNN copy is hidden inside its library, so
``native/lstm_op.cc`` wraps the oneDNN that pip installs (``onednn-cpu-gomp``) in two ops,
``CharrnnLstm`` and ``CharrnnLstmGrad``, built on the user's machine against the installed
TensorFlow:

    python -m charrnn_keras.native_lstm      # `make install` runs it

Training only: validation, sampling and the SavedModel run standard TensorFlow ops, so the
export stays loadable by stock TF Serving. Where the op is not built (no compiler, another
platform), ``FastLSTM`` trains with its pure TensorFlow loop; run.json records which ran.

The op runs its own threads (OpenMP), as many as TensorFlow's intra-op pool; two ops side by
side each start a team, so TensorFlow's default of both pools full would put two teams on the
same cores (``train.thread_pools`` sizes the pools for it). With one intra-op thread, a layer
splits its batch rows into one op per inter-op thread (``op_chains``): for small layers two
single-threaded ops side by side beat one op on two cores (BENCHMARKS.md, 1).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "lstm_op.cc"
LIBRARY = SOURCE.with_name("_lstm_op.so")  # and _lstm_op.json: what it was built from


class BuildError(RuntimeError):
    """The op could not be compiled; the message ends with the compiler's last lines."""


def _fingerprint() -> dict:
    """What a built library must match to be loaded: this source and this TensorFlow."""
    import tensorflow as tf

    return {
        "source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        "tensorflow": tf.version.VERSION,
    }


def _onednn_prefix() -> Path:
    """Where pip put oneDNN's headers and library (a wheel's data files go under the prefix)."""
    return Path(sysconfig.get_path("data"))


def build(output: Path = LIBRARY) -> Path:
    """Compiles the op against the installed TensorFlow and oneDNN.

    Args:
        output: the shared library to write (its ``.json`` stamp is written beside it).

    Returns:
        The library's path.

    Raises:
        BuildError: no oneDNN headers, or the compiler failed (its output is then in
            ``output`` with the suffix ``.log``).
    """
    import tensorflow as tf

    prefix = _onednn_prefix()
    if not (prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp").is_file():
        raise BuildError(
            f"oneDNN's headers are not in {prefix / 'include'}: "
            "pip install onednn-cpu-gomp onednn-devel-cpu-gomp"
        )
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    cmd = [
        "g++", "-std=c++17", "-O2", "-shared", "-fPIC", "-fopenmp", "-w",
        str(SOURCE), "-o", str(partial),
        *tf.sysconfig.get_compile_flags(),
        f"-I{prefix / 'include'}",
        *tf.sysconfig.get_link_flags(),
        f"-L{prefix / 'lib'}", "-l:libdnnl.so.3", f"-Wl,-rpath,{prefix / 'lib'}",
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise BuildError("no C++ compiler (g++) on PATH") from e
    log = output.with_suffix(".log")
    if done.returncode:
        # The error goes on one line (the caller prints it as the whole of stderr); the
        # compiler's full output stays in the log for whoever has to read it.
        partial.unlink(missing_ok=True)
        log.write_text(done.stderr)
        lines = done.stderr.strip().splitlines()
        first = next((line for line in lines if "error" in line), lines[-1] if lines else "")
        raise BuildError(f"g++ failed: {first.strip()} (full output: {log})")
    log.unlink(missing_ok=True)
    partial.replace(output)  # a library is either whole or absent
    output.with_suffix(".json").write_text(json.dumps(_fingerprint()) + "\n")
    load.cache_clear()
    return output


@functools.cache
def load(library: Path = LIBRARY):
    """Loads the built op, or returns None when it is not built or was built for another
    TensorFlow or source (``build`` again).

    Args:
        library: the shared library; its ``.json`` stamp lies beside it.

    Returns:
        The op module (``charrnn_lstm``, ``charrnn_lstm_grad``), or None.
    """
    import tensorflow as tf

    library = Path(library)
    if not library.is_file():
        return None
    try:
        stamp = json.loads(library.with_suffix(".json").read_text())
    except (OSError, ValueError):
        stamp = None
    if stamp != _fingerprint():
        logger.info(
            "%s was built for another TensorFlow or source, so training uses TensorFlow ops; "
            "python -m charrnn_keras.native_lstm rebuilds it",
            library,
        )
        return None
    try:
        return tf.load_op_library(str(library))
    except (tf.errors.NotFoundError, OSError) as e:
        logger.info("%s did not load (%s); not used", library, e)
        return None


def available() -> bool:
    """Whether the op is built and loads."""
    return load() is not None


def resolve(loop: str, bfloat16: bool = False) -> str:
    """The training loop that ``loop`` (``model.lstm_loop``) means on this machine.

    Args:
        loop: ``auto`` (the op where it is built, no GPU is visible, as the op runs on the
            CPU only, and oneDNN has kernels for the dtype), ``onednn`` or ``tensorflow``.
        bfloat16: whether the loop is to multiply in bf16 (``model.matmul_dtype``).

    Returns:
        ``onednn`` or ``tensorflow``.

    Raises:
        ConfigError: ``onednn`` was asked for and the op is not built, or cannot run bf16 on
            this CPU.
    """
    import tensorflow as tf

    from charrnn_keras.errors import ConfigError

    if loop == "tensorflow":
        return "tensorflow"
    if not available():
        if loop == "onednn":
            raise ConfigError(
                'model.lstm_loop = "onednn" needs the oneDNN LSTM op, which is not built: run '
                "`python -m charrnn_keras.native_lstm` (make install does), or set "
                'model.lstm_loop = "auto"'
            )
        return "tensorflow"
    if loop == "auto" and tf.config.list_physical_devices("GPU"):
        return "tensorflow"
    if bfloat16 and not runs_bfloat16():
        if loop == "onednn":
            raise ConfigError(
                "oneDNN's LSTM has no bfloat16 kernels for this CPU (they need AVX-512): set "
                'model.matmul_dtype = "auto" or "float32", or model.lstm_loop = "auto"'
            )
        return "tensorflow"  # whose bf16 matmuls run anywhere, emulated where not native
    return "onednn"


@functools.cache
def runs_bfloat16() -> bool:
    """Whether oneDNN's bf16 LSTM runs on this CPU (it needs AVX-512; without it the op fails
    when it creates its primitive), asked of oneDNN itself with a one-step, one-unit LSTM."""
    import tensorflow as tf

    ops = load()
    if ops is None:
        return False
    with tf.init_scope():  # eager, also when asked while a training graph is traced
        one = tf.zeros([1, 1], tf.bfloat16)
        try:
            ops.charrnn_lstm(one[None], one, tf.zeros([1, 1]), tf.zeros([1, 4]),
                             tf.zeros([1, 4]), tf.zeros([4]))  # fmt: skip
        except tf.errors.OpError:
            return False
    return True


def row_sizes(batch: int, chains: int) -> list[int]:
    """The batch rows of each chain: as even as can be, the first ones a row larger."""
    return [batch // chains + (k < batch % chains) for k in range(chains)]


def op_chains(intra: int | None = None, inter: int | None = None, cores: int | None = None) -> int:
    """How many ops a layer's batch rows are split into: one per inter-op thread when each op
    gets one intra-op thread (what ``train.thread_pools`` gives small layers), else 1, so that
    the ops' OpenMP teams never share a core.

    Args:
        intra: intra-op threads (default: this process's pool; 0 is TensorFlow's default, one
            per core).
        inter: inter-op threads (default: this process's pool; 0 as for ``intra``).
        cores: the CPU count (default: this machine's).

    Returns:
        ``min(inter, cores // intra)``, at least 1.
    """
    import tensorflow as tf

    threading = tf.config.threading
    cores = cores or os.cpu_count() or 1
    intra = (threading.get_intra_op_parallelism_threads() if intra is None else intra) or cores
    inter = (threading.get_inter_op_parallelism_threads() if inter is None else inter) or cores
    return max(1, min(inter, cores // intra))


def lstm_sequence(x, h0, c0, kernel, recurrent_kernel, bias, bfloat16=False, chains=1):
    """Runs an LSTM over a whole sequence with oneDNN's fused primitive.

    Computes what ``keras.layers.LSTM`` computes (tanh, sigmoid gates, bias; gates in Keras
    order i, f, c, o, which is oneDNN's), with oneDNN's backward pass as the gradient.

    Args:
        x: ``[batch, time, in]`` float32 inputs.
        h0: ``[batch, units]`` initial output state.
        c0: ``[batch, units]`` initial cell state.
        kernel: ``[in, 4 * units]``.
        recurrent_kernel: ``[units, 4 * units]``.
        bias: ``[4 * units]``.
        bfloat16: run oneDNN's bf16 kernels: inputs, outputs and hidden states rounded to
            bf16 (as PyTorch's autocast does), products accumulated, the cell state and all
            gradients kept, in float32.
        chains: split the batch rows into this many ops, which TensorFlow's inter-op threads
            run side by side (``op_chains``); rows never interact, so the result is the same
            up to rounding (the weight gradients are the chains' sums). 1 when the batch is
            unknown or smaller than ``chains``.

    Returns:
        ``(outputs [batch, time, units], h_last, c_last)``, float32.
    """
    import tensorflow as tf

    ops = load()
    if ops is None:
        raise RuntimeError("the oneDNN LSTM op is not built: python -m charrnn_keras.native_lstm")
    data = tf.bfloat16 if bfloat16 else tf.float32

    @tf.custom_gradient
    def core(x, h0, c0, kernel, recurrent_kernel, bias):
        x_in, h_in = tf.cast(x, data), tf.cast(h0, data)
        weights = (kernel, recurrent_kernel, bias)
        y, h, c, workspace = ops.charrnn_lstm(x_in, h_in, c0, *weights)

        def grad(dy, dh, dc):
            return ops.charrnn_lstm_grad(x_in, h_in, c0, *weights, y, h, c, workspace, dy, dh, dc)

        return (tf.cast(y, tf.float32), tf.cast(h, tf.float32), c), grad

    batch = x.shape[0]
    if batch is None or batch < chains or chains <= 1:
        return core(x, h0, c0, kernel, recurrent_kernel, bias)
    sizes = row_sizes(batch, chains)
    parts = [
        core(*rows, kernel, recurrent_kernel, bias)
        for rows in zip(*(tf.split(t, sizes) for t in (x, h0, c0)), strict=True)
    ]
    return tuple(tf.concat(list(p), axis=0) for p in zip(*parts, strict=True))


def main() -> int:
    """``python -m charrnn_keras.native_lstm``: builds the op; one line either way."""
    from charrnn_keras.startup import load_tensorflow

    load_tensorflow(verbose=False)
    try:
        path = build()
    except BuildError as e:
        print(f"charrnn: oneDNN LSTM op not built ({e}); training uses TensorFlow ops",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
