"""Warm-up: is the first request to a freshly started server slower than the next ones?

Usage::

    python bench/serving_warmup.py                  # 5 trials, with and without the file
    python bench/serving_warmup.py --trials 3 --no-compare

One random-weight 2 x 512 run (speed does not depend on the weights) is exported; a copy
without ``assets.extra/tf_serving_warmup_requests`` is made beside it. Each trial starts a fresh
``charrnn serve`` in a subprocess, connects a client channel and waits until the model is
AVAILABLE (GetModelStatus, so the connection is not in the timing), then times ``--requests``
200-character ``generate`` requests in a row. Before the trials the client's own code (request
building, gRPC's Predict call, reply decoding) is run against a server that is not timed, so
the first timed request pays only what the server pays. The figures are the medians over the
trials of request 1, 2, ... and of request 1 minus request 2 within each trial.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import common
import serving_speed as speed

from charrnn_keras.serving import names
from charrnn_keras.serving.client import Client


def trial(export_dir: Path, requests: int, chars: int) -> list[float]:
    """Starts a fresh server on ``export_dir``; returns the ms of its first ``requests``."""
    proc, address = speed.start_server(export_dir)  # returns once GetModelStatus answers
    try:
        with Client(address, speed.MODEL, timeout=120) as client:
            deadline = time.monotonic() + 120
            while "AVAILABLE" not in client.status().values():
                if time.monotonic() > deadline:
                    raise RuntimeError("the model did not become AVAILABLE")
                time.sleep(0.2)
            times = []
            for r in range(requests):
                start = time.perf_counter()
                client.generate(speed.PRIME, chars, seed=r)
                times.append((time.perf_counter() - start) * 1000)
            return times
    finally:
        proc.kill()
        proc.wait()


def without_warmup_file(export_dir: Path, copy: Path) -> Path:
    """A copy of the export without TF Serving's warm-up file."""
    shutil.copytree(export_dir, copy)
    for version in (copy / speed.MODEL).iterdir():
        shutil.rmtree(version / names.WARMUP_DIR, ignore_errors=True)
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="fresh servers per export")
    parser.add_argument("--requests", type=int, default=3, help="timed requests per server")
    parser.add_argument("--chars", type=int, default=200)
    parser.add_argument("--no-compare", action="store_true", help="only the export with the file")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        exports = {"with the warm-up file": speed.make_export(Path(tmp), 512)}
        if not args.no_compare:
            exports["without it"] = without_warmup_file(
                exports["with the warm-up file"], Path(tmp) / "bare"
            )
        trial(exports["with the warm-up file"], args.requests, args.chars)  # the client's code
        # Alternate the exports, so drift in the machine's load hits both alike.
        runs: dict[str, list[list[float]]] = {name: [] for name in exports}
        for t in range(args.trials):
            for name, path in exports.items():
                times = trial(path, args.requests, args.chars)
                runs[name].append(times)
                print(f"{name:>22}, trial {t + 1}: " + ", ".join(f"{ms:.1f}" for ms in times),
                      flush=True)  # fmt: skip
        for name, trials in runs.items():
            medians = [statistics.median(ts[r] for ts in trials) for r in range(args.requests)]
            gaps = [ts[0] - ts[1] for ts in trials]
            row = {"export": name, "trials": trials, "median_ms": medians,
                   "first_minus_second_ms": gaps,
                   "median_first_minus_second_ms": statistics.median(gaps)}  # fmt: skip
            results.append(row)
            print(f"{name:>22}: medians " + ", ".join(f"{m:.1f}" for m in medians)
                  + f" ms; first - second: median {row['median_first_minus_second_ms']:+.1f} ms"
                  + f" (range {min(gaps):+.1f} to {max(gaps):+.1f})", flush=True)  # fmt: skip
    common.emit({"machine": common.machine(), "chars": args.chars, "rows": results})


if __name__ == "__main__":
    main()
