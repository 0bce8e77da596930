"""Do long generations starve short ones? Latency of short requests beside long ones.

Usage::

    python bench/serving_fairness.py EXPORT_VERSION_DIR [--rows 64] [--chars 3000]
    python bench/serving_fairness.py EXPORT_DIR --server [--rows 64] [--chars 3000]

Two "long" requests (``--rows`` rows of ``--chars`` characters) start together, and while they
run, 20-character requests are sent one after another; their latencies are reported.

With ``--server``, over gRPC to a ``charrnn serve`` subprocess on 127.0.0.1 (the code on
PYTHONPATH: run it once with the old code, once with the new). Without it, in-process on
graph-mode Sessions, for each way of running the long ones:

- ``shared``: everything in one Session, one inter-op thread pool (the server before issue 15);
- ``pool``: one Session with two inter-op pools, long runs on a 1-thread pool
  (``RunOptions.inter_op_thread_pool``, as TF Serving does for its batch threads);
- ``lane``: the long runs in a separate Session (the server's heavy lane) with its own 1-thread
  inter-op pool.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def load(path, pools=None):
    config = tf.compat.v1.ConfigProto()
    for threads in pools or ():
        config.session_inter_op_thread_pool.add(num_threads=threads)
    session = tf.compat.v1.Session(graph=tf.Graph(), config=config)
    with session.graph.as_default():
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(path))
    return session, meta.signature_def["generate"]


def feed(signature, rows, chars):
    i = signature.inputs
    return {
        i["prime"].name: np.array([b"The "] * rows, object),
        i["num_chars"].name: np.full([rows], chars, np.int32),
        i["temperature"].name: np.ones([rows], np.float32),
        i["top_k"].name: np.zeros([rows], np.int32),
        i["top_p"].name: np.ones([rows], np.float32),
        i["seed"].name: np.array([[1, 0]] * rows, np.int64),
        i["strategy"].name: np.array([b"sample"] * rows, object),
    }


def measure(light, heavy, heavy_options, rows, chars):
    (ls, lsig), (hs, hsig) = light, heavy
    lout, hout = lsig.outputs["text"].name, hsig.outputs["text"].name
    ls.run(lout, feed(lsig, 1, 20))
    hs.run(hout, feed(hsig, 1, 20), options=heavy_options)
    done = threading.Event()
    started = time.perf_counter()
    heavy_times = []

    def long_run():
        t = time.perf_counter()
        hs.run(hout, feed(hsig, rows, chars), options=heavy_options)
        heavy_times.append(time.perf_counter() - t)

    threads = [threading.Thread(target=long_run) for _ in range(2)]
    for t in threads:
        t.start()
    latencies = []
    while any(t.is_alive() for t in threads):
        t = time.perf_counter()
        ls.run(lout, feed(lsig, 1, 20))
        latencies.append(time.perf_counter() - t)
    for t in threads:
        t.join()
    done.set()
    return {
        "short_p50_ms": 1000 * statistics.median(latencies),
        "short_max_ms": 1000 * max(latencies),
        "short_count": len(latencies),
        "long_s": max(heavy_times),
        "wall_s": time.perf_counter() - started,
    }


def over_grpc(export_dir, rows, chars):
    """The same measurement against a ``charrnn serve`` subprocess."""
    import re
    import subprocess
    import sys
    import tempfile

    from charrnn_keras.serving.client import Client

    log = tempfile.NamedTemporaryFile(suffix=".log", delete=False)
    argv = [sys.executable, "-m", "charrnn_keras.cli", "serve", "--export-dir", str(export_dir),
            "--port", "0"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not (m := re.search(r"listening on 127.0.0.1:(\d+)", open(log.name).read())):
            assert proc.poll() is None, open(log.name).read()
            time.sleep(0.1)
        address = f"127.0.0.1:{m.group(1)}"
        with Client(address, timeout=600) as client:
            client.generate("The ", 20)
            t = time.perf_counter()
            for _ in range(20):
                client.generate("The ", 20)
            print(f"alone: 20-char request {1000 * (time.perf_counter() - t) / 20:.1f} ms")
            long_times = []

            def long_run():
                with Client(address, timeout=600) as own:
                    t = time.perf_counter()
                    own.generate(["The "] * rows, chars)
                    long_times.append(time.perf_counter() - t)

            threads = [threading.Thread(target=long_run) for _ in range(2)]
            for thread in threads:
                thread.start()
            time.sleep(1.0)  # both long requests running (or waiting, in the heavy lane)
            latencies = []
            while any(thread.is_alive() for thread in threads):
                t = time.perf_counter()
                client.generate("The ", 20)
                latencies.append(time.perf_counter() - t)
            for thread in threads:
                thread.join()
        print("server", {
            "short_p50_ms": 1000 * statistics.median(latencies),
            "short_max_ms": 1000 * max(latencies),
            "short_count": len(latencies),
            "long_s": sorted(long_times),
        })  # fmt: skip
    finally:
        proc.terminate()
        proc.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--chars", type=int, default=3000)
    parser.add_argument("--server", action="store_true")
    args = parser.parse_args()
    if args.server:
        over_grpc(args.path, args.rows, args.chars)
        return
    alone = load(args.path)
    s, sig = alone
    t = time.perf_counter()
    for _ in range(20):
        s.run(sig.outputs["text"].name, feed(sig, 1, 20))
    print(f"alone: 20-char request {1000 * (time.perf_counter() - t) / 20:.1f} ms")
    print("shared", measure(alone, alone, None, args.rows, args.chars))
    pooled = load(args.path, pools=[0, 1])
    print("pool", measure(pooled, pooled, tf.compat.v1.RunOptions(inter_op_thread_pool=1),
                          args.rows, args.chars))  # fmt: skip
    print("lane", measure(alone, load(args.path, pools=[1]), None, args.rows, args.chars))


if __name__ == "__main__":
    main()
