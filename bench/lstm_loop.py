"""FastLSTM's two training loops, and the thread pools for oneDNN's fused op.

Usage::

    python bench/lstm_loop.py                    # both seed shapes, every thread setting, ~6 min
    python bench/lstm_loop.py --shapes 000 --threads 1,2 2,1

Two measurements, each thread setting in its own process (TensorFlow fixes its pools at the
first op), every figure the median of interleaved 1-second windows:

- ``layer``: one LSTM layer of the seed shape, forward and backward (a scalar loss of the
  outputs and the cell state), in milliseconds: oneDNN's op in float32 and, where oneDNN runs
  bf16 (AVX-512), in bf16, and FastLSTM's TensorFlow loop in bf16 (with the chains and
  time_chunks of ``configs/shakespeare_fast.toml``); and, where PyTorch is installed, its
  ``nn.LSTM`` in float32 (``torch-f32``) in a process of its own at ``--torch-threads``.
- ``step``: the seed model's whole Keras training step on the op (``train_on_batch`` through
  ``build_model``/``compile_model``) in bf16 and float32, each with the batch split by the
  pools (``native_lstm.op_chains``, what trains) and as one op per layer (``_one_op``); and the
  bf16 step's parts (the float32 step's where oneDNN has no bf16): forward alone, forward and
  backward, and with Adam (clipped) but outside Keras's train function.

Results go to ``bench/results/lstm_loop_<parts>.json``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import time

import common

THREADS = ["1,1", "2,1", "1,2", "2,2"]  # intra,inter; 2,2 is TensorFlow's default on 2 cores


def _windows(fns: dict, rounds: int) -> dict:
    """Times each function in turn for ``rounds`` 1-second windows; ms per call, median."""
    for f in fns.values():  # trace and warm up
        for _ in range(3):
            f()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < 1.0:
                f()
                calls += 1
            times[name].append((time.perf_counter() - start) / calls * 1000)
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def layer_worker(shape: dict, rounds: int) -> dict:
    import numpy as np
    import tensorflow as tf

    from charrnn_keras import native_lstm, tf_lstm

    b, t, n_in, u = (
        shape["batch_size"],
        shape["seq_length"],
        shape["embedding_dim"],
        shape["rnn_size"],
    )
    rng = np.random.default_rng(0)
    sizes = [(b, t, n_in), (b, u), (b, u), (n_in, 4 * u), (u, 4 * u), (4 * u,)]
    args = [tf.Variable(rng.normal(0, 0.1, s).astype("float32")) for s in sizes]

    def timed(run):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                y, _, c = run(*args)
                loss = tf.reduce_sum(y) + tf.reduce_sum(c)
            return tape.gradient(loss, args)

        return lambda: step()[0].numpy()

    chunks = max(1, t // 10)
    fns = {
        "onednn-f32": timed(lambda *a: native_lstm.lstm_sequence(*a)),
        # The batch split into one op per inter-op thread, as FastLSTM trains on these pools.
        "onednn-f32-split": timed(lambda *a: native_lstm.lstm_sequence(
            *a, chains=native_lstm.op_chains())),
    }  # fmt: skip
    if native_lstm.runs_bfloat16():  # oneDNN's bf16 LSTM needs AVX-512
        fns |= {
            "tensorflow-bf16": timed(lambda *a: tf_lstm.lstm_sequence(
                *a, matmul_dtype="bfloat16", chains=2, time_chunks=chunks)),
            "onednn-bf16": timed(lambda *a: native_lstm.lstm_sequence(*a, bfloat16=True)),
            "onednn-bf16-split": timed(lambda *a: native_lstm.lstm_sequence(
                *a, bfloat16=True, chains=native_lstm.op_chains())),
        }  # fmt: skip
    return _windows(fns, rounds)


def torch_layer_worker(shape: dict, rounds: int) -> dict:
    """PyTorch's ``nn.LSTM`` layer of the seed shape (the same oneDNN primitive), forward and
    backward as ``layer_worker`` times ours, at PyTorch's threads from ``--threads-one``."""
    import torch

    b, t, n_in, u = (
        shape["batch_size"],
        shape["seq_length"],
        shape["embedding_dim"],
        shape["rnn_size"],
    )
    layer = torch.nn.LSTM(n_in, u, batch_first=True)
    x = torch.randn(b, t, n_in, requires_grad=True)

    def step():
        y, (_, c) = layer(x)
        (y.sum() + c.sum()).backward()

    return _windows({"torch-f32": step}, rounds)


def step_worker(shape: dict, rounds: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from charrnn_keras import native_lstm
    from charrnn_keras.config import ModelConfig, TrainConfig
    from charrnn_keras.model import build_model, compile_model

    b, t = shape["batch_size"], shape["seq_length"]
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, common.VOCAB_SIZE, (b, t)), tf.int32)
    y = tf.constant(rng.integers(0, common.VOCAB_SIZE, (b, t)), tf.int32)

    def keras_model(impl, one_op=False):
        """A compiled seed model, traced; ``one_op``: each layer one op, not split by the
        pools (``native_lstm.op_chains``), as before the split."""
        cfg = ModelConfig(
            embedding_dim=shape["embedding_dim"],
            rnn_size=shape["rnn_size"],
            num_layers=shape["num_layers"],
            **common.lstm_settings(impl),
        )
        model = build_model(cfg, common.VOCAB_SIZE, b, t)
        compile_model(model, TrainConfig())
        pools = native_lstm.op_chains
        if one_op:
            native_lstm.op_chains = lambda: 1  # read when the train function is traced
        model.train_on_batch(x, y)
        native_lstm.op_chains = pools
        return model

    impls = ("onednn-bf16", "onednn") if native_lstm.runs_bfloat16() else ("onednn",)
    steps = {
        f"keras_step_{impl}{'_one_op' if one_op else ''}": keras_model(impl, one_op)
        for impl in impls for one_op in (False, True)
    }  # fmt: skip
    model = steps[f"keras_step_{impls[0]}"]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    weights = model.trainable_variables
    adam = keras.optimizers.Adam(global_clipnorm=5.0)
    adam.build(weights)

    @tf.function
    def forward():
        return loss_fn(y, model(x, training=True))

    @tf.function
    def gradients():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, weights)

    @tf.function
    def update():
        adam.apply_gradients(zip(gradients(), weights, strict=True))
        return adam.iterations

    return _windows(
        {
            "forward": lambda: forward().numpy(),
            "forward_backward": lambda: gradients()[-1].numpy(),  # [0], the embedding's: sparse
            "with_adam": lambda: update().numpy(),
            **{name: functools.partial(m.train_on_batch, x, y) for name, m in steps.items()},
        },
        rounds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(common.CONFIGS))
    parser.add_argument("--threads", nargs="+", default=THREADS, help="intra,inter")
    parser.add_argument("--rounds", type=int, default=5, help="windows per measurement")
    parser.add_argument("--parts", nargs="+", default=["layer", "step"], choices=["layer", "step"])
    parser.add_argument("--torch-threads", default="2,1", help="PyTorch's threads,interop")
    parser.add_argument("--worker", choices=["layer", "step", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--threads-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "torch":
        import torch_ref

        torch_ref.set_threads(*(int(v) for v in args.threads_one.split(",")))
        common.emit(torch_layer_worker(common.CONFIGS[args.shape], args.rounds))
        return
    if args.worker:
        common.set_tf_threads(*(int(v) for v in args.threads_one.split(",")))
        worker = layer_worker if args.worker == "layer" else step_worker
        common.emit(worker(common.CONFIGS[args.shape], args.rounds))
        return
    results = {"machine": common.machine(), "rounds": args.rounds, "shapes": {}}
    for shape in args.shapes:
        entry = results["shapes"][shape] = {"shape": common.CONFIGS[shape]}
        for what in args.parts:
            runs = [(what, threads) for threads in args.threads]
            if what == "layer" and importlib.util.find_spec("torch"):
                runs.append(("torch", args.torch_threads))
            for worker, threads in runs:
                r = common.run_worker(
                    "lstm_loop.py",
                    ["--worker", worker, "--shape", shape, "--threads-one", threads,
                     "--rounds", str(args.rounds)],
                    timeout=900,
                )  # fmt: skip
                r.pop("wall_s", None)
                key = threads if worker == what else f"{worker} {threads}"
                entry.setdefault(what, {})[key] = r
                print(f"{shape} {what} threads {key}: {r} (ms)", flush=True)
    path = common.RESULTS / f"lstm_loop_{'_'.join(args.parts)}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
