"""A load-generating client process for the serving benchmarks: gRPC only, no TensorFlow.

Started by ``serving_batching.py`` (``python bench/grpc_load.py``), it reads one JSON line
from stdin, ``{"address": ..., "requests": [[base64 PredictRequest, ...] per client]}``, opens
one channel per client, sends each client's first request once, untimed (the connection), and
prints ``ready``. Each ``go`` line then makes every client send its requests one
after another, all clients at once, and prints one JSON line: ``{"start": s, "end": s,
"times": [s, ...]}`` (``time.perf_counter``, CLOCK_MONOTONIC, comparable across processes on
Linux). ``quit`` ends it. Requests are serialized in the parent and sent as bytes, so a client
thread holds the GIL only to hand them to gRPC: many clients in one process do not throttle
each other, and several processes share the clients.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time

import grpc

_PREDICT = "/tensorflow.serving.PredictionService/Predict"


def window(predicts: list, per_client: list[list[bytes]]) -> dict:
    """Every client sends its requests one after another, all clients at once.

    Returns:
        ``{"start": s, "end": s, "times": [s, ...]}``.
    """
    times: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(per_client) + 1)

    def client(predict, requests):
        barrier.wait()
        for request in requests:
            begin = time.perf_counter()
            predict(request, timeout=300)
            with lock:
                times.append(time.perf_counter() - begin)

    threads = [threading.Thread(target=client, args=pair)
               for pair in zip(predicts, per_client, strict=True)]  # fmt: skip
    for t in threads:
        t.start()
    start = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    return {"start": start, "end": time.perf_counter(), "times": times}


def main() -> None:
    setup = json.loads(sys.stdin.readline())
    every = [[base64.b64decode(r) for r in rs] for rs in setup["requests"]]
    channels = [grpc.insecure_channel(setup["address"]) for _ in every]
    predicts = [ch.unary_unary(_PREDICT) for ch in channels]  # bytes in, bytes out
    for predict, requests in zip(predicts, every, strict=True):
        predict(requests[0], timeout=300)  # connects; not timed
    per_client = [requests[1:] for requests in every]
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        print(json.dumps(window(predicts, per_client)), flush=True)
    for ch in channels:
        ch.close()


if __name__ == "__main__":
    main()
