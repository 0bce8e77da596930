"""Serving speed of an exported 2x512 LSTM (random weights): one-call generate vs per-step calls.

Usage::

    python bench/serving_speed.py                  # the full run (a few minutes on 2 cores)
    python bench/serving_speed.py --quick          # a smoke run: small counts, seconds
    python bench/serving_speed.py --json bench/results/serving_speed.json

It exports a random-weight model to a temporary directory, starts ``charrnn serve`` on a free
loopback port in a subprocess (so server and client do not share a GIL), then measures:

- one ``generate`` of ``--chars`` characters in-process (graph-mode Session, as the server runs
  it) and over gRPC, against a loop of ``--chars`` ``step`` calls (in-process and over gRPC);
- p50/p99 latency and requests/s of 200-character ``generate`` over gRPC with 1 and 8 clients;
- characters/s of ``generate`` in-process at batch 1 and 8.

The weights are random: speed does not depend on what the model has learned.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
        names.NUM_CHARS: np.int32(chars),
        names.TEMPERATURE: np.float32(1.0),
        names.TOP_K: np.int32(0),
        names.SEED: np.array([seed, 0], np.int64),
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


def run(rnn_size: int, chars: int, repeats: int, requests: int) -> dict:
    """Runs every measurement; returns the results as a dict (seconds and rates)."""
    results: dict = {"model": f"2x{rnn_size} lstm", "chars": chars}
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = make_export(Path(tmp), rnn_size)
        loaded = LoadedVersion(export_dir / MODEL / "1", 1)
        generate = session_runner(loaded, names.GENERATE)
        step = session_runner(loaded, names.STEP)
        zeros = {n: np.zeros([1, rnn_size], np.float32)
                 for n in loaded.signatures[names.STEP].inputs if n != names.CHAR_IDS}  # fmt: skip
        results["inprocess_generate_s"] = statistics.median(
            timed(lambda: generate(generate_inputs(1, chars)), repeats))  # fmt: skip
        results["inprocess_step_loop_s"] = statistics.median(
            timed(lambda: step_loop(step, zeros, chars), repeats))  # fmt: skip
        for batch in (1, 8):
            seconds = statistics.median(
                timed(lambda b=batch: generate(generate_inputs(b, chars)), repeats))  # fmt: skip
            results[f"inprocess_batch{batch}_chars_per_s"] = batch * chars / seconds
        loaded.retire()
        proc, address = start_server(export_dir)
        try:
            with Client(address, MODEL, timeout=300) as client:
                results["grpc_generate_s"] = statistics.median(
                    timed(lambda: client.generate(PRIME, chars), repeats))  # fmt: skip
                zero = {k: v for k, v in zeros.items()}

                def grpc_step(inputs):
                    return client.predict(names.STEP, inputs)

                results["grpc_step_loop_s"] = statistics.median(
                    timed(lambda: step_loop(grpc_step, zero, chars), repeats))  # fmt: skip
            for clients in (1, 8):
                times, wall = latencies(address, clients, requests, 200)
                results[f"grpc_200_c{clients}_p50_ms"] = pct(times, 50)
                results[f"grpc_200_c{clients}_p99_ms"] = pct(times, 99)
                results[f"grpc_200_c{clients}_req_per_s"] = len(times) / wall
        finally:
            proc.terminate()
            proc.wait(30)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="LSTM units per layer")
    parser.add_argument("--chars", type=int, default=500, help="characters per generate")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--requests", type=int, default=40, help="requests per latency client")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.requests, args.chars = 1, 3, min(args.chars, 100)
    print(f"tensorflow {tf.__version__}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    results = run(args.size, args.chars, args.repeats, args.requests)
    n = results["chars"]
    print(f"model {results['model']}, {n} characters per generate (medians)")
    for key in ("inprocess_generate_s", "inprocess_step_loop_s", "grpc_generate_s",
                "grpc_step_loop_s"):  # fmt: skip
        print(f"  {key:<28} {results[key] * 1000:9.1f} ms  {n / results[key]:9.0f} chars/s")
    for batch in (1, 8):
        key = f"inprocess_batch{batch}_chars_per_s"
        print(f"  {key:<28} {results[key]:9.0f} chars/s")
    for clients in (1, 8):
        p = f"grpc_200_c{clients}"
        print(
            f"  200-char generate, {clients} client(s): p50 {results[p + '_p50_ms']:.1f} ms, "
            f"p99 {results[p + '_p99_ms']:.1f} ms, {results[p + '_req_per_s']:.1f} requests/s"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
