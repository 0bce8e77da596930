"""Characters per second of ``charrnn sample`` (``Sampler.generate``), 2-layer LSTMs.

Usage::

    python bench/sample_speed.py                   # 2x128 and 2x512, 7 windows of 1000 chars
    python bench/sample_speed.py --sizes 128 --windows 3 --chars 200
    python bench/sample_speed.py --json bench/results/sample_speed.json
    python bench/sample_speed.py --kernels matmul matvec   # side by side, windows alternating

Each size gets one warm-up generation (tracing the compiled calls), then ``--windows`` timed
generations of ``--chars`` characters, consumed one by one as the CLI does; min/median/max
characters per second are printed. The weights are random: speed does not depend on what the
model has learned.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import string
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import common  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from charrnn_keras.config import ModelConfig  # noqa: E402
from charrnn_keras.sampling import Sampler  # noqa: E402
from charrnn_keras.vocab import Vocab  # noqa: E402

# tiny-shakespeare's 65 characters
CHARS = "\n !$&',-.3:;?" + string.ascii_uppercase + string.ascii_lowercase
PRIME = "The "


def measure(rnn_size: int, chars: int, windows: int, temperature: float,
            kernels: list[str]) -> dict[str, list[float]]:  # fmt: skip
    """Returns characters/second for each timed window of a 2-layer LSTM of ``rnn_size``, per
    kernel (``Sampler``'s); the kernels take turns window by window, on the same weights."""
    keras.utils.set_random_seed(0)
    vocab = Vocab(CHARS)
    cfg = ModelConfig(embedding_dim=64, rnn_size=rnn_size, num_layers=2)
    first = Sampler(cfg, vocab, kernel=kernels[0])
    samplers = {kernels[0]: first}
    for kernel in kernels[1:]:
        samplers[kernel] = Sampler(cfg, vocab, first.model, kernel=kernel)
    rates = {kernel: [] for kernel in kernels}
    for sampler in samplers.values():
        sampler.sample(PRIME, chars, temperature=temperature)  # warm-up: traces the step once
    for window in range(windows):
        for kernel, sampler in samplers.items():
            start = time.perf_counter()
            for _ in sampler.generate(PRIME, chars, temperature=temperature, seed=window):
                pass
            rates[kernel].append(chars / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512], help="LSTM units")
    parser.add_argument("--chars", type=int, default=1000, help="characters per timed window")
    parser.add_argument("--windows", type=int, default=7, help="timed windows per size")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="2 windows of 200 characters")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--kernels", nargs="+", default=["auto"],
                        help="Sampler kernels to compare (auto, matmul, matvec)")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.windows, args.chars = 2, 200
    machine = common.machine()
    devices = ", ".join(d.device_type for d in tf.config.list_logical_devices())
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, devices: {devices}")
    print(f"{machine['cpu']}, {machine['cpus']} CPUs")
    print(f"{'model':>8} {'kernel':>7} {'min':>9} {'median':>9} {'max':>9}  chars/s")
    results = {"machine": machine, "quick": args.quick, "chars": args.chars, "chars_per_s": {}}
    for size in args.sizes:
        by_kernel = measure(size, args.chars, args.windows, args.temperature, args.kernels)
        for kernel, rates in by_kernel.items():
            key = f"2 x {size}" if args.kernels == ["auto"] else f"2 x {size}, {kernel}"
            results["chars_per_s"][key] = rates
            print(
                f"{'2x' + str(size):>8} {kernel:>7} {min(rates):9.0f} "
                f"{statistics.median(rates):9.0f} {max(rates):9.0f}"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
