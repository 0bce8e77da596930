"""Generation and serving speed of an exported 2x512 LSTM (random weights).

Usage::

    python bench/serving_speed.py                  # the full run (a few minutes on 2 cores)
    python bench/serving_speed.py --quick          # a smoke run: small counts, seconds
    python bench/serving_speed.py --json bench/results/serving_speed.json

It exports a random-weight model to a temporary directory, starts ``charrnn serve`` on a free
loopback port in a subprocess (so server and client do not share a GIL), then measures, each
as ``--repeats`` timed windows after one warm-up call:

- characters/s of one ``generate`` call of ``--chars`` characters per row, at batch 1 and 8,
  in-process (a graph-mode Session on the SavedModel, as TF Serving runs it) and over gRPC;
- for comparison, a loop of ``--chars`` ``step`` calls at batch 1 (in-process and over gRPC);
- p50/p99 latency, requests/s and characters/s of 200-character ``generate`` requests over
  gRPC with 1 and 8 concurrent clients.

The weights are random: speed does not depend on what the model has learned.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import common  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from charrnn_keras import model as model_lib  # noqa: E402
from charrnn_keras.config import Config, ModelConfig  # noqa: E402
from charrnn_keras.export import export_run  # noqa: E402
from charrnn_keras.serving import names  # noqa: E402
from charrnn_keras.serving.client import Client, RequestFailed  # noqa: E402
from charrnn_keras.serving.servable import LoadedVersion  # noqa: E402
from charrnn_keras.vocab import Vocab  # noqa: E402

CHARS = "\n !$&',-.3:;?" + string.ascii_uppercase + string.ascii_lowercase  # tiny-shakespeare's
PRIME = "The "
MODEL = "charrnn"


def make_export(workdir: Path, rnn_size: int) -> Path:
    """Writes a random-weight run and exports it; returns the export directory."""
    run_dir = workdir / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg = Config(model=ModelConfig(embedding_dim=64, rnn_size=rnn_size, num_layers=2))
    (run_dir / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    vocab = Vocab(sorted(CHARS))
    vocab.save(run_dir / "vocab.json")
    model = model_lib.build_model(cfg.model, len(vocab), batch_size=1, seq_length=1)
    model.save_weights(run_dir / "checkpoints" / "best.weights.h5")
    export_run(run_dir, workdir / "export", MODEL)
    return workdir / "export"


def timed(fn, repeats: int) -> list[float]:
    """Returns the seconds of each of ``repeats`` calls of ``fn`` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def session_runner(loaded: LoadedVersion, signature: str):
    """Returns run(inputs) -> outputs on a loaded version's Session, by signature aliases."""
    sig = loaded.signatures[signature]
    fetch = {k: v.name for k, v in sig.outputs.items()}
    return lambda inputs: loaded.session.run(fetch, {sig.inputs[k].name: v
                                                     for k, v in inputs.items()})  # fmt: skip


def generate_inputs(batch: int, chars: int, seed: int = 0) -> dict:
    return {
        names.PRIME: np.array([PRIME.encode()] * batch, object),
        names.NUM_CHARS: np.full([batch], chars, np.int32),
        names.TEMPERATURE: np.ones([batch], np.float32),
        names.TOP_K: np.zeros([batch], np.int32),
        names.TOP_P: np.ones([batch], np.float32),
        names.SEED: np.array([[seed + row, 0] for row in range(batch)], np.int64),
        names.STRATEGY: np.array([b"sample"] * batch, object),
    }


def step_loop(step, zero_states: dict, chars: int) -> None:
    """``chars`` step calls, each feeding back the argmax and the returned state."""
    states, ids = zero_states, np.zeros([1, 1], np.int32)
    for _ in range(chars):
        out = step({names.CHAR_IDS: ids, **states})
        ids = np.argmax(out.pop(names.LOGITS), axis=-1).astype(np.int32)[:, None]
        states = out


def latencies(address: str, clients: int, requests: int, chars: int) -> tuple[list, float]:
    """Runs ``requests`` generate calls per client in parallel; returns (seconds, wall)."""
    times: list[float] = []
    lock, barrier = threading.Lock(), threading.Barrier(clients + 1)

    def worker(index: int) -> None:
        with Client(address, MODEL, timeout=120) as client:
            client.generate(PRIME, chars, seed=index)  # connect and warm up
            barrier.wait()
            for r in range(requests):
                start = time.perf_counter()
                client.generate(PRIME, chars, seed=index * requests + r)
                with lock:
                    times.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return times, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export_dir: Path) -> tuple[subprocess.Popen, str]:
    """Starts ``charrnn serve`` in a subprocess; returns it and its address once it answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "charrnn_keras.cli", "serve", "--export-dir", str(export_dir),
           "--model-name", MODEL, "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    with Client(address, MODEL, timeout=5) as client:
        while True:
            try:
                client.status()
                return proc, address
            except RequestFailed:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError("charrnn serve did not start") from None
                time.sleep(0.5)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def rates(fn, chars: int, repeats: int) -> list[float]:
    """Characters per second of each timed call of ``fn`` (which writes ``chars``)."""
    return [chars / t for t in timed(fn, repeats)]


def run(rnn_size: int, chars: int, repeats: int, requests: int) -> dict:
    """Runs every measurement; returns the results as a dict (chars/s per window, latencies)."""
    results: dict = {"model": f"2 x {rnn_size} LSTM", "chars": chars, "repeats": repeats}
    speed: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = make_export(Path(tmp), rnn_size)
        loaded = LoadedVersion(export_dir / MODEL / "1", 1)
        generate = session_runner(loaded, names.GENERATE)
        step = session_runner(loaded, names.STEP)
        zeros = {n: np.zeros([1, rnn_size], np.float32)
                 for n in loaded.signatures[names.STEP].inputs if n != names.CHAR_IDS}  # fmt: skip
        for batch in (1, 8):
            inputs = generate_inputs(batch, chars)
            speed[f"generate, in-process, batch {batch}"] = rates(
                lambda i=inputs: generate(i), batch * chars, repeats
            )
        speed["step loop, in-process, batch 1"] = rates(
            lambda: step_loop(step, zeros, chars), chars, repeats
        )
        loaded.retire()
        proc, address = start_server(export_dir)
        try:
            with Client(address, MODEL, timeout=300) as client:
                for batch in (1, 8):
                    primes = [PRIME] * batch
                    speed[f"generate, gRPC, batch {batch}"] = rates(
                        lambda p=primes: client.generate(p, chars), batch * chars, repeats
                    )

                def grpc_step(inputs):
                    return client.predict(names.STEP, inputs)

                speed["step loop, gRPC, batch 1"] = rates(
                    lambda: step_loop(grpc_step, zeros, chars), chars, max(1, repeats // 2)
                )
            results["chars_per_s"] = speed
            results["latency"] = []
            for clients in (1, 8):
                times, wall = latencies(address, clients, requests, 200)
                results["latency"].append({
                    "clients": clients, "requests": len(times), "chars": 200,
                    "p50_ms": pct(times, 50), "p99_ms": pct(times, 99),
                    "requests_per_s": len(times) / wall,
                    "chars_per_s": len(times) * 200 / wall,
                })  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(30)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="LSTM units per layer")
    parser.add_argument("--chars", type=int, default=500, help="characters per generate row")
    parser.add_argument("--repeats", type=int, default=7, help="timed windows per measurement")
    parser.add_argument("--requests", type=int, default=40, help="requests per latency client")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.requests, args.chars = 2, 3, min(args.chars, 100)
    machine = common.machine()
    print(f"tensorflow {tf.__version__}; {machine['cpu']}, {machine['cpus']} CPUs")
    results = {"machine": machine, "quick": args.quick,
               **run(args.size, args.chars, args.repeats, args.requests)}  # fmt: skip
    print(f"{results['model']}, {results['chars']} characters per row, chars/s per window:")
    for label, values in results["chars_per_s"].items():
        print(f"  {label:<32} min {min(values):7.0f}  median {statistics.median(values):7.0f}"
              f"  max {max(values):7.0f}")  # fmt: skip
    for r in results["latency"]:
        print(f"  200-char generate, {r['clients']} client(s): p50 {r['p50_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms, {r['requests_per_s']:.1f} requests/s")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
