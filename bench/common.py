"""Shared helpers of the benchmark scripts: the benchmarked configs, statistics, machine facts,
and worker subprocesses that print one JSON line.

The scripts in bench/ run as ``python bench/<name>.py`` from the repository root; each
measurement that depends on thread settings or on which library is loaded runs in its own
subprocess, so that TensorFlow and PyTorch never share a process or a thread pool.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
VOCAB_SIZE = 65  # tinyshakespeare's symbols

# The two reference notebooks' shapes (see ../shared/seeds/README.md). Seed 001 one-hot
# encodes its input; we use an embedding of the LSTM's width instead (our model always embeds),
# which is the more expensive choice: layer 1's kernel is [512, 2048] instead of [83, 2048].
CONFIGS = {
    "000": dict(num_layers=2, rnn_size=128, embedding_dim=128, batch_size=60, seq_length=50),
    "001": dict(num_layers=2, rnn_size=512, embedding_dim=512, batch_size=100, seq_length=100),
}

# Our implementations: (FastLSTM's matmul dtype, its training loop); None is Keras's LSTM.
IMPLS = {
    "keras": None,
    "fast": ("float32", "tensorflow"),
    "fast-bf16": ("bfloat16", "tensorflow"),
    "onednn": ("float32", "onednn"),
    "onednn-bf16": ("bfloat16", "onednn"),
}


def train_flops_per_char(
    num_layers: int, rnn_size: int, embedding_dim: int, vocab: int = VOCAB_SIZE, **_
) -> float:
    """Returns the matmul FLOPs of one training step per character.

    Forward: each LSTM layer multiplies ``[x_t, h_{t-1}]`` (``in + u``) by ``[in + u, 4u]``; the
    logits layer ``u`` by ``[u, vocab]``; a multiply-add counts 2. Backward is twice the forward
    (gradients of both operands), so a training step is 3x. Element-wise work is not counted.
    """
    forward, n_in = 0, embedding_dim
    for _ in range(num_layers):
        forward += 2 * (n_in + rnn_size) * 4 * rnn_size
        n_in = rnn_size
    forward += 2 * rnn_size * vocab
    return 3.0 * forward


def stats(values) -> dict:
    """Returns min, median, max (and the raw values) of a list of numbers."""
    values = [float(v) for v in values]
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "values": values,
    }


def machine() -> dict:
    """Returns what a reader needs to compare figures: CPU model, cores, flags, load, versions."""
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_1min": os.getloadavg()[0],
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["bf16"] = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
                info["avx512"] = "avx512f" in flags
                break
    except OSError:
        pass
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (ValueError, OSError):
        pass
    return info


def set_tf_threads(intra: int, inter: int) -> None:
    """Sets TensorFlow's thread pools; must run before TensorFlow executes anything."""
    import tensorflow as tf

    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)


def lstm_settings(impl: str, chains: int = 1, time_chunks: int = 1) -> dict:
    """Returns the ``[model]`` keys that select the LSTM a benchmark measures.

    Args:
        impl: a key of ``IMPLS``.
        chains: FastLSTM's ``chains``.
        time_chunks: FastLSTM's ``time_chunks``.

    Returns:
        ``fast_lstm``, ``matmul_dtype``, ``chains``, ``time_chunks`` and ``lstm_loop``, as
        ModelConfig takes them.
    """
    if IMPLS[impl] is None:
        return {"fast_lstm": False, "matmul_dtype": "float32", "chains": 1, "time_chunks": 1,
                "lstm_loop": "auto"}  # fmt: skip
    matmul_dtype, loop = IMPLS[impl]
    return {"fast_lstm": True, "matmul_dtype": matmul_dtype, "chains": chains,
            "time_chunks": time_chunks, "lstm_loop": loop}  # fmt: skip


def parse_tf_threads(spec: str) -> tuple[int, int, int, int]:
    """Reads ``"intra,inter[,chains[,time_chunks]]"`` (missing values are 1)."""
    values = [int(v) for v in spec.split(",")]
    return tuple(values + [1] * (4 - len(values)))


def tinyshakespeare_ids(path: Path = DATA):
    """Returns (ids as a uint8 numpy array, vocabulary size) of the benchmark corpus at ``path``."""
    import numpy as np

    raw = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
    symbols, ids = np.unique(raw, return_inverse=True)
    return ids.astype(np.uint8), len(symbols)


def run_worker(
    script: str, args: list[str], timeout: float, env: dict | None = None, echo: bool = False
) -> dict:
    """Runs ``bench/<script> args`` in a fresh process and returns the JSON its last line holds.

    Args:
        echo: print the worker's other stdout lines as they come (progress of long runs).

    Returns:
        The parsed JSON, or ``{"error": ...}`` with the tail of stderr when the worker failed.
    """
    cmd = [sys.executable, str(BENCH / script), *args]
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    full_env.update(env or {})
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as err:  # a file: a full stderr pipe would block it
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=full_env, cwd=REPO
        )
        timed_out = threading.Event()

        def expire():
            timed_out.set()
            proc.kill()

        killer = threading.Timer(timeout, expire)
        killer.start()
        out = []
        for line in proc.stdout:
            out.append(line)
            if echo and not line.startswith("{"):
                print(line, end="", flush=True)
        proc.wait()
        killer.cancel()
        err.seek(0)
        stderr = err.read()
    if timed_out.is_set():
        return {"error": f"timed out after {timeout:.0f} s: {' '.join(cmd[1:])}"}
    lines = [line for line in out if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (stderr or "".join(out)).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    result = json.loads(lines[-1])
    result["wall_s"] = round(time.monotonic() - start, 1)
    return result


def emit(result: dict) -> None:
    """Prints a worker's result as one JSON line (the last line of its stdout)."""
    print(json.dumps(result), flush=True)


def scale_bias_lr(model, factor: float) -> None:
    """Multiplies the recurrent layers' bias learning rate (``--bias-lr``): torch's LSTM has two
    biases (``b_ih``, ``b_hh``) that Adam moves one learning rate each, so their sum moves two."""
    import keras

    optimizer = model.optimizer
    biases = {
        id(layer.cell.bias.value) for layer in model.layers if isinstance(layer, keras.layers.RNN)
    }
    update_step = optimizer.update_step

    def scaled(gradient, variable, learning_rate):
        if id(variable) in biases:
            learning_rate = learning_rate * factor
        return update_step(gradient, variable, learning_rate)

    optimizer.update_step = scaled
