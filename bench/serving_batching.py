"""Request batching: requests/s and latency of many clients, with and without batching.

Usage::

    python bench/serving_batching.py                 # 8 and 64 clients, 5 windows (minutes)
    python bench/serving_batching.py --clients 8 --windows 3 --requests 6
    python bench/serving_batching.py --variant "1 thread=num_batch_threads:1"

One random-weight 2 x 512 run (speed does not depend on the weights) is exported as it is and
with ``--batching_parameters_file`` (TensorFlow's BatchFunction in the graph, the export's
default parameters, ``batching.DEFAULTS``); each ``--variant NAME=field:value,...`` exports
it once more with those BatchingParameters fields changed (``grpc_threads:N`` sets the
server's gRPC worker threads instead, ``intra:N`` its intra-op threads, ``batching:0``
serves the export without batching).
Every export is served by its own ``charrnn serve`` server in a process of its own on
loopback. Clients send 200-character ``generate`` requests one after another, all at once,
from client processes of their own (``grpc_load.py``: gRPC only, requests serialized up front)
so that the clients' GIL and Python work do not throttle the server they measure. The servers
take turns in ``--windows`` windows (the order rotating), so drift in the machine's load hits
them alike; a server's figure is the median of its windows' requests/s, and the ratio is the
median of the per-window ratios against the server without batching in the same window.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import serving_speed as speed
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from charrnn_keras import batching
from charrnn_keras.export import export_run
from charrnn_keras.serving import names
from charrnn_keras.serving.client import Client, RequestFailed
from charrnn_keras.serving.servable import INTRA_OP_THREADS

PLAIN, BATCHED = "no batching", "batching (defaults)"
_SERVE = """import sys
from charrnn_keras.serving.server import start_server
start_server(sys.argv[1], sys.argv[2], port=int(sys.argv[3]), max_workers=int(sys.argv[4]),
             intra_op_threads=int(sys.argv[5])).wait()
"""


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=field:value,...`` -> (NAME, {field: int value})."""
    name, _, fields = text.partition("=")
    pairs = [f.split(":") for f in fields.split(",") if f]
    return name, {k.strip(): int(v) for k, v in pairs}


def export_variant(tmp: Path, name: str, fields: dict) -> Path:
    """Exports the benchmark's run with the default BatchingParameters changed by ``fields``."""
    params = batching.default_parameters()
    for key, value in fields.items():
        if key == "allowed_batch_sizes":
            continue
        getattr(params, key).value = value
    if "max_batch_size" in fields:  # the sizes must end with max_batch_size
        del params.allowed_batch_sizes[:]
        params.allowed_batch_sizes.extend(
            [s for s in batching.DEFAULTS["allowed_batch_sizes"] if s < fields["max_batch_size"]]
            + [fields["max_batch_size"]]
        )
    if fields.get("allowed_batch_sizes") == 0:  # allowed_batch_sizes:0 turns padding off
        del params.allowed_batch_sizes[:]
    slug = "".join(c if c.isalnum() else "_" for c in name)
    file = batching.write_parameters(tmp / f"{slug}.txt", params)
    out = tmp / f"export_{slug}"
    export_run(tmp / "run", out, speed.MODEL, batching_parameters_file=file)
    return out


def start_server(export_dir: Path, workers: int, intra: int) -> tuple[subprocess.Popen, str]:
    """``charrnn serve``'s start_server in a subprocess with ``workers`` gRPC threads and
    ``intra`` intra-op threads."""
    port = speed.free_port()
    cmd = [sys.executable, "-c", _SERVE, str(export_dir), speed.MODEL, str(port), str(workers),
           str(intra)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    with Client(address, speed.MODEL, timeout=5) as client:
        deadline = time.monotonic() + 180
        while True:
            try:
                if "AVAILABLE" in client.status().values():
                    return proc, address
            except RequestFailed:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the server on {export_dir} did not start")
            time.sleep(0.5)


def requests_for(client: int, count: int, chars: int) -> list[str]:
    """``count`` serialized generate requests (base64) of one client, as Client.generate
    builds them, each with its own seed."""
    out = []
    for r in range(count + 1):  # the first is the untimed connection request
        request = predict_pb2.PredictRequest()
        request.model_spec.name = speed.MODEL
        request.model_spec.signature_name = names.GENERATE
        inputs = speed.generate_inputs(1, chars, seed=client * (count + 1) + r)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        out.append(base64.b64encode(request.SerializeToString()).decode())
    return out


class Load:
    """The client processes of one server: ``clients`` clients over ``processes`` processes."""

    def __init__(self, address: str, clients: int, processes: int, requests: int, chars: int):
        every = [requests_for(c, requests, chars) for c in range(clients)]
        self.procs = []
        for p in range(min(processes, clients)):
            proc = subprocess.Popen(
                [sys.executable, str(common.BENCH / "grpc_load.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            setup = {"address": address, "requests": every[p::processes]}
            proc.stdin.write(json.dumps(setup) + "\n")
            proc.stdin.flush()
            self.procs.append(proc)
        for proc in self.procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a client process did not start")

    def window(self) -> tuple[list[float], float]:
        """Runs one window; returns (seconds of each request, wall seconds)."""
        for proc in self.procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        parts = [json.loads(proc.stdout.readline()) for proc in self.procs]
        wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
        return [t for p in parts for t in p["times"]], wall

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.write("quit\n")
            proc.stdin.close()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--requests", type=int, default=8, help="per client and window")
    parser.add_argument("--windows", type=int, default=5, help="turns each server takes")
    parser.add_argument("--chars", type=int, default=200)
    parser.add_argument("--processes", type=int, default=4, help="client processes per server")
    parser.add_argument("--grpc-threads", type=int, default=64, help="servers' gRPC workers")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=parse_variant,
        help="NAME=field:value,... another batched export (repeatable)",
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        intra = INTRA_OP_THREADS
        exports = {
            PLAIN: (speed.make_export(tmp, 512), args.grpc_threads, intra),
            BATCHED: (export_variant(tmp, BATCHED, {}), args.grpc_threads, intra),
        }
        for name, fields in args.variant:
            threads = fields.pop("grpc_threads", args.grpc_threads)
            intra = fields.pop("intra", INTRA_OP_THREADS)
            if fields.pop("batching", 1) == 0:
                path = exports[PLAIN][0]
            else:
                path = export_variant(tmp, name, fields) if fields else exports[BATCHED][0]
            exports[name] = (path, threads, intra)
        servers = {name: start_server(*spec) for name, spec in exports.items()}
        try:
            for clients in args.clients:
                loads = {name: Load(address, clients, args.processes, args.requests, args.chars)
                         for name, (_, address) in servers.items()}  # fmt: skip
                rates: dict[str, list[float]] = {name: [] for name in loads}
                times: dict[str, list[float]] = {name: [] for name in loads}
                order = list(loads)
                for w in range(args.windows):
                    for name in order[w % len(order) :] + order[: w % len(order)]:
                        ts, wall = loads[name].window()
                        times[name] += ts
                        rates[name].append(len(ts) / wall)
                    print(
                        f"{clients} clients, window {w + 1}: "
                        + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in order)
                        + " req/s",
                        flush=True,
                    )
                for load in loads.values():
                    load.close()
                for name in order:
                    ratios = [b / a for a, b in zip(rates[PLAIN], rates[name], strict=True)]
                    row = {"server": name, "clients": clients, "requests": len(times[name]),
                           "windows": rates[name],
                           "requests_per_s": statistics.median(rates[name]),
                           "p50_ms": speed.pct(times[name], 50),
                           "p99_ms": speed.pct(times[name], 99),
                           "ratio": statistics.median(ratios),
                           "ratio_range": [min(ratios), max(ratios)]}  # fmt: skip
                    rows.append(row)
                    print(f"{name:>24}, {clients:>2} clients: {row['requests_per_s']:6.1f} req/s "
                          f"({min(rates[name]):.1f}-{max(rates[name]):.1f}), p50 "
                          f"{row['p50_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} ms, ratio "
                          f"{row['ratio']:.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                          flush=True)  # fmt: skip
        finally:
            for proc, _ in servers.values():
                proc.kill()
                proc.wait()
    common.emit({"machine": common.machine(), "rows": rows, "args": {
        "requests": args.requests, "windows": args.windows, "processes": args.processes,
        "grpc_threads": args.grpc_threads}})  # fmt: skip


if __name__ == "__main__":
    main()
