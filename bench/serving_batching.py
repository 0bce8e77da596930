"""Request batching: requests/s and latency of many clients, with and without batching.

Usage::

    python bench/serving_batching.py                 # 1, 8 and 64 clients (a few minutes)
    python bench/serving_batching.py --clients 8 --requests 10

One random-weight 2 x 512 run (speed does not depend on the weights) is exported twice: as it
is, and with ``--batching_parameters_file`` (TensorFlow's BatchFunction in the graph, the
export's default parameters: batches of up to 64 rows, 2 ms wait). Each export is served by
``charrnn serve`` in a subprocess on loopback, and clients send 200-character ``generate``
requests one after another, all at once; the two servers are measured in turn at each client
count, so the machine's drift hits both alike.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common
import serving_speed as speed

from charrnn_keras.batching import write_parameters
from charrnn_keras.export import export_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=8, help="per client")
    parser.add_argument("--chars", type=int, default=200)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = speed.make_export(Path(tmp), 512)
        batched = Path(tmp) / "batched"
        params = write_parameters(Path(tmp) / "batching_parameters.txt")
        export_run(Path(tmp) / "run", batched, speed.MODEL, batching_parameters_file=params)
        servers = {name: speed.start_server(path) for name, path in
                   [("no batching", plain), ("batching in the graph", batched)]}  # fmt: skip
        try:
            for clients in args.clients:
                for name, (_, address) in servers.items():
                    times, wall = speed.latencies(address, clients, args.requests, args.chars)
                    row = {"server": name, "clients": clients, "requests": len(times),
                           "p50_ms": speed.pct(times, 50), "p99_ms": speed.pct(times, 99),
                           "requests_per_s": len(times) / wall}  # fmt: skip
                    rows.append(row)
                    print(
                        f"{name:>22}, {clients:>2} clients: {row['requests_per_s']:6.1f} req/s, "
                        f"p50 {row['p50_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} ms",
                        flush=True,
                    )
        finally:
            for proc, _ in servers.values():
                proc.kill()
                proc.wait()
    common.emit({"machine": common.machine(), "rows": rows})


if __name__ == "__main__":
    main()
