"""Which LSTM path the shipped configs should train on by default: Keras's LSTM or FastLSTM.

Usage::

    python bench/defaults.py                       # default, shakespeare and anna shapes
    python bench/defaults.py --threads 1,2         # TensorFlow's intra,inter thread pools

Both implementations are built in one process from the same config and weights, and timed in
interleaved windows of training steps (Keras LSTM, FastLSTM, Keras LSTM, ...), so that the
machine's drift hits both alike; the figure is the median ratio of window times. Each thread
setting needs its own process (TensorFlow fixes its pools at the first op).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import common

SHAPES = {  # the shipped configs' data and model shapes
    "default": dict(batch_size=64, seq_length=64, num_layers=2, rnn_size=128, embedding_dim=64),
    "shakespeare": dict(batch_size=60, seq_length=50, num_layers=2, rnn_size=128, embedding_dim=64),
    "anna": dict(batch_size=100, seq_length=100, num_layers=2, rnn_size=512, embedding_dim=64),
}


def measure(name: str, windows: int, steps: int, chains: int) -> dict:
    import keras
    import numpy as np

    from charrnn_keras.config import ModelConfig, TrainConfig
    from charrnn_keras.model import build_model, compile_model

    shape = dict(SHAPES[name])
    batch, seq = shape.pop("batch_size"), shape.pop("seq_length")
    vocab = 65
    keras.utils.set_random_seed(0)
    base = ModelConfig(**shape)
    models = {}
    for impl, cfg in {
        "keras": base,
        "fast": dataclasses.replace(base, fast_lstm=True, chains=chains),
    }.items():
        model = build_model(cfg, vocab, batch, seq)
        compile_model(model, TrainConfig())
        models[impl] = model
    models["fast"].set_weights(models["keras"].get_weights())
    rng = np.random.default_rng(0)
    x = rng.integers(0, vocab, (batch, seq)).astype("int32")
    y = rng.integers(0, vocab, (batch, seq)).astype("int32")
    for model in models.values():  # compile and warm up
        for _ in range(3):
            model.train_on_batch(x, y)
    times = {impl: [] for impl in models}
    for _ in range(windows):
        for impl, model in models.items():
            start = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(x, y)
            times[impl].append(time.perf_counter() - start)
    ratios = [k / f for k, f in zip(times["keras"], times["fast"], strict=True)]
    chars = batch * seq * steps
    return {
        "shape": SHAPES[name],
        "chains": chains,
        "keras_chars_per_s": chars / statistics.median(times["keras"]),
        "fast_chars_per_s": chars / statistics.median(times["fast"]),
        "fast_over_keras_median": statistics.median(ratios),
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--threads", default="0,0", help="intra,inter (0 = TensorFlow's default)")
    parser.add_argument("--chains", type=int, default=1)
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    intra, inter = (int(v) for v in args.threads.split(","))
    common.set_tf_threads(intra, inter)
    for name in args.shapes:
        steps = max(1, args.steps // 5) if name == "anna" else args.steps
        result = measure(name, args.windows, steps, args.chains)
        result.update(threads=args.threads, machine=common.machine())
        common.emit({name: result})


if __name__ == "__main__":
    main()
