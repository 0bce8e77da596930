"""Training throughput: characters per second of a full training step, ours and PyTorch's.

Usage::

    python bench/train_speed.py                  # both configs, all implementations, ~20 min
    python bench/train_speed.py --quick          # a smoke run, ~5 min
    python bench/train_speed.py --configs 001 --impls fast-bf16 torch

For each config (``common.CONFIGS``) every implementation runs in its own process: Keras's
``model.fit`` over the package's tf.data pipeline with Keras's LSTM (``keras``), with FastLSTM
(``fast``), with FastLSTM and bf16 matmuls (``fast-bf16``), and the PyTorch reference
(``torch``; ``torch-bf16`` under CPU autocast). Each first tries its candidate thread settings
in one short window apiece and keeps the fastest; then ``--rounds`` rounds take the
implementations in turn, each a fresh process timing ``--windows`` windows of several steps
after a warm-up, so that the machine's drift hits them alike. The float32 and bf16 rates of a
2048x2048 TensorFlow matmul are measured in the same run to turn characters per second into a
fraction of the machine's matmul rate. Results go to ``bench/results/train_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import common

# Steps per timed window: windows of about 2-3 s on a quiet 2-core machine.
STEPS_PER_WINDOW = {"000": 40, "001": 2}

# Candidate thread settings. Ours: "intra,inter,chains,time_chunks" (TensorFlow's intra-op
# and inter-op threads, FastLSTM's chains and time_chunks; Keras's LSTM uses only the first
# two); PyTorch: "threads,interop". The first is used without a sweep (--quick).
TF_CANDIDATES = ["2,2,1,1", "1,2,2,1", "1,2,2,2", "1,2,2,5", "1,2,2,10"]
TORCH_CANDIDATES = ["2,1", "1,1"]
# oneDNN's fused op runs its own thread per core: one inter-op thread (native_lstm.py).
ONEDNN_CANDIDATES = ["2,1", "1,2", "1,1"]
IMPL_NAMES = ["keras", "fast", "fast-bf16", "onednn", "onednn-bf16", "torch", "torch-bf16"]


def tf_worker(args) -> dict:
    """Times ``model.fit`` of one of our implementations; returns the result dict."""
    intra, inter, chains, time_chunks = common.parse_tf_threads(args.threads)
    common.set_tf_threads(intra, inter)
    import keras

    from charrnn_keras import data as data_lib
    from charrnn_keras.config import ModelConfig, TrainConfig
    from charrnn_keras.model import build_model, compile_model

    shape = common.CONFIGS[args.config]
    ids, vocab = common.tinyshakespeare_ids()
    ds, _ = data_lib.make_dataset(ids, shape["batch_size"], shape["seq_length"])
    keras.utils.set_random_seed(0)
    cfg = ModelConfig(
        embedding_dim=shape["embedding_dim"],
        rnn_size=shape["rnn_size"],
        num_layers=shape["num_layers"],
        **common.lstm_settings(args.impl, chains, time_chunks),
    )
    model = build_model(cfg, vocab, shape["batch_size"], shape["seq_length"])
    compile_model(model, TrainConfig())

    marks = []

    class Marks(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            marks.append(time.perf_counter())

    total = args.warmup + args.windows * args.steps
    history = model.fit(
        ds.repeat(), steps_per_epoch=total, epochs=1, verbose=0, callbacks=[Marks()]
    )
    ends = marks[args.warmup - 1 :: args.steps]
    seconds = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {"seconds": seconds, "final_loss": history.history["loss"][-1]}


def torch_worker(args) -> dict:
    """Times the PyTorch reference; returns the result dict."""
    import torch_ref

    threads, interop = (int(v) for v in args.threads.split(","))
    torch_ref.set_threads(threads, interop)
    shape = common.CONFIGS[args.config]
    ids, vocab = common.tinyshakespeare_ids()
    xs, ys = torch_ref.batches(ids, shape["batch_size"], shape["seq_length"])
    trainer = torch_ref.Trainer(
        vocab,
        shape["embedding_dim"],
        shape["rnn_size"],
        shape["num_layers"],
        shape["batch_size"],
        bf16=args.impl == "torch-bf16",
    )
    seconds = torch_ref.timed_windows(trainer, xs, ys, args.warmup, args.windows, args.steps)
    return {"seconds": seconds}


def matmul_worker(args) -> dict:
    """Times a 2048x2048 TensorFlow matmul in ``args.dtype``; returns GFLOP/s per window."""
    intra, inter, _, _ = common.parse_tf_threads(args.threads)
    common.set_tf_threads(intra, inter)
    import tensorflow as tf

    n = 2048
    a = tf.cast(tf.random.normal((n, n)), args.dtype)
    b = tf.cast(tf.random.normal((n, n)), args.dtype)
    matmul = tf.function(tf.matmul)
    matmul(a, b).numpy()
    rates = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.steps):
            out = matmul(a, b)
        out.numpy()
        rates.append(2 * n**3 * args.steps / (time.perf_counter() - start) / 1e9)
    return {"gflops": rates}


def _measure(impl, config, threads, windows, steps, warmup, timeout, extra=()) -> dict:
    args = ["--worker", "--impl", impl, "--config", config, "--threads", threads]
    args += ["--windows", str(windows), "--steps", str(steps), "--warmup", str(warmup), *extra]
    return common.run_worker("train_speed.py", args, timeout)


def _first_per_thread_pair(candidates: list[str]) -> list[str]:
    """Keeps one candidate per (intra, inter) pair: Keras's LSTM has no chains or chunks."""
    seen, kept = set(), []
    for candidate in candidates:
        pair = tuple(candidate.split(",")[:2])
        if pair not in seen:
            seen.add(pair)
            kept.append(candidate)
    return kept


def _rate(result: dict, chars_per_window: int) -> float:
    return chars_per_window / min(result["seconds"]) if "seconds" in result else 0.0


def run(args) -> dict:
    """Runs every measurement in its own process and returns the results (also saved)."""
    results = {"machine": common.machine(), "quick": args.quick, "configs": {}}
    windows = 2 if args.quick else args.windows
    timeout = 900 if args.quick else 1800
    rates = {}
    for dtype in ("float32", "bfloat16"):
        r = _measure("matmul", "000", "2,2,1", windows, 5, 0, timeout, ["--dtype", dtype])
        rates[dtype] = r if "error" in r else common.stats(r["gflops"])
        print(f"matmul 2048^3 {dtype}: {rates[dtype].get('median', r)} GFLOP/s", flush=True)
    results["matmul_gflops"] = rates
    for config in args.configs:
        shape = common.CONFIGS[config]
        steps = STEPS_PER_WINDOW[config] // (2 if args.quick and config == "000" else 1)
        chars_per_window = shape["batch_size"] * shape["seq_length"] * steps
        flops = common.train_flops_per_char(**shape)
        entry = {"shape": shape, "train_flops_per_char": flops, "impls": {}}
        best = {}
        for impl in args.impls:
            candidates = args.torch_threads if impl.startswith("torch") else args.tf_threads
            if impl == "keras":
                candidates = _first_per_thread_pair(candidates)
            if impl.startswith("onednn"):
                candidates = args.onednn_threads
            tried = {}
            if len(candidates) > 1 and not args.quick:
                for threads in candidates:
                    trial = _measure(impl, config, threads, 1, steps, 2, timeout)
                    tried[threads] = round(_rate(trial, chars_per_window))
                    print(f"{config} {impl} try {threads}: {tried[threads]:,} chars/s", flush=True)
                best[impl] = max(candidates, key=lambda c: tried[c])
            else:
                best[impl] = candidates[0]
            entry["impls"][impl] = {"threads": best[impl], "sweep": tried, "seconds": []}
        # Rounds of one process per implementation, in turn: drift hits every one alike.
        for _ in range(1 if args.quick else args.rounds):
            for impl in args.impls:
                r = entry["impls"][impl]
                if "error" in r:
                    continue
                got = _measure(impl, config, best[impl], windows, steps, 2 if args.quick else 3,
                               timeout)  # fmt: skip
                if "error" in got:
                    r["error"] = got["error"]
                    print(f"{config} {impl}: {got['error']}", flush=True)
                    continue
                r["seconds"] += got["seconds"]
                r.setdefault("final_loss", got.get("final_loss"))
        for impl in args.impls:
            r = entry["impls"][impl]
            if "error" in r:
                continue
            r["chars_per_s"] = common.stats(chars_per_window / s for s in r["seconds"])
            med = r["chars_per_s"]["median"]
            for dtype, rate in rates.items():
                if "error" not in rate:
                    r[f"fraction_of_{dtype}_matmul"] = med * flops / 1e9 / rate["median"]
            print(f"{config} {impl} ({best[impl]}): {med:,.0f} chars/s median", flush=True)
        results["configs"][config] = entry
    common.RESULTS.mkdir(exist_ok=True)
    out = common.RESULTS / ("train_speed_quick.json" if args.quick else "train_speed.json")
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="no sweep, 2 short windows")
    parser.add_argument(
        "--rounds", type=int, default=3, help="processes per implementation, taken in turn"
    )
    parser.add_argument("--configs", nargs="+", default=list(common.CONFIGS))
    parser.add_argument("--impls", nargs="+", default=IMPL_NAMES, help=", ".join(IMPL_NAMES))
    parser.add_argument("--windows", type=int, default=5, help="timed windows")
    parser.add_argument(
        "--tf-threads",
        nargs="+",
        default=TF_CANDIDATES,
        help="ours: intra,inter[,chains[,time_chunks]]",
    )
    parser.add_argument(
        "--onednn-threads", nargs="+", default=ONEDNN_CANDIDATES, help="ours on oneDNN: intra,inter"
    )
    parser.add_argument(
        "--torch-threads", nargs="+", default=TORCH_CANDIDATES, help="PyTorch: threads,interop"
    )
    # Worker mode (one measurement, one JSON line), used by the driver above.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--threads", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.impl.startswith("torch"):
            common.emit(torch_worker(args))
        elif args.impl == "matmul":
            common.emit(matmul_worker(args))
        else:
            common.emit(tf_worker(args))
    else:
        run(args)


if __name__ == "__main__":
    main()
