"""Training steps per second on one device, under ``mirrored`` and on two loopback workers.

Usage::

    python bench/distribute_speed.py                    # 3 rounds, ~6 min on 2 cores
    python bench/distribute_speed.py --rounds 1 --steps 20

Each round runs, one after another, so that machine noise hits all of them alike:

* ``none``: today's single-device path (``train.distribute = "none"``);
* ``mirrored``: ``MirroredStrategy`` over the CPU cut into 2 logical devices;
* ``workers``: ``MultiWorkerMirroredStrategy``, 2 processes on loopback (``TF_CONFIG``), each
  with the CPU as its one device; the chief's step times are reported.

Every mode builds the model, optimizer and per-replica dataset the way ``charrnn train`` does
(``distribute``/``replicas``) and runs ``model.fit`` with the same global batch; a callback
records each step's wall time, and the median of the steps after the first ``--warmup`` is the
mode's step time for that round. In the same processes the all-reduce of one step's gradients
(a SUM over replicas of tensors shaped like the model's trainable variables) is timed alone:
that is the communication a step adds. Results go to
``bench/results/distribute_speed_<config>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import common

MODES = ("none", "mirrored", "workers")


def worker(args) -> None:
    """One training process: times ``--steps`` steps of ``model.fit``; prints one JSON line."""
    import keras
    import numpy as np
    import tensorflow as tf

    from charrnn_keras import data as data_lib
    from charrnn_keras import distribute, replicas
    from charrnn_keras.config import load_config
    from charrnn_keras.model import build_model, compile_model

    shape = common.CONFIGS[args.config]
    mode = {"workers": "multi_worker"}.get(args.mode, args.mode)
    overrides = [
        f'train.distribute="{mode}"',
        f"data.batch_size={shape['batch_size']}",
        f"data.seq_length={shape['seq_length']}",
        f"model.rnn_size={shape['rnn_size']}",
        f"model.num_layers={shape['num_layers']}",
        f"model.embedding_dim={shape['embedding_dim']}",
    ]
    if mode == "mirrored":
        overrides.append("train.replicas=2")
    cfg = load_config(common.REPO / "configs" / "default.toml", overrides)
    topo = distribute.make_topology(cfg)
    ids, vocab = common.tinyshakespeare_ids()
    ids = ids.astype(np.int32)
    B, T = cfg.data.batch_size, cfg.data.seq_length
    keras.utils.set_random_seed(0)
    with replicas.building(topo):
        model = build_model(cfg.model, vocab, B // topo.replicas, T)
        compile_model(model, cfg.train, distributed=topo.strategy is not None)
    replicas.use_scope_strategy(model, topo)
    if topo.strategy is None:
        ds, _ = data_lib.make_dataset(ids, B, T)
        ds = ds.repeat()
    else:
        ds, _ = distribute.distributed_dataset(topo, ids, B, T)

    times: list[float] = []

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.t)

    with topo.scope():
        model.fit(ds, epochs=1, steps_per_epoch=args.steps, verbose=0, callbacks=[StepTimes()])

    allreduce_ms = None
    if topo.strategy is not None:
        shapes = [v.shape for v in model.trainable_variables]

        @tf.function
        def reduce_once():
            def step():
                grads = [tf.ones(s) for s in shapes]
                ctx = tf.distribute.get_replica_context()
                return ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)[0]

            return topo.strategy.run(step)

        reduce_once()  # trace and set up the collectives
        samples = []
        for _ in range(args.steps):
            t = time.perf_counter()
            topo.strategy.experimental_local_results(reduce_once())[0].numpy()
            samples.append(time.perf_counter() - t)
        allreduce_ms = 1000 * statistics.median(samples)

    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    common.emit({
        "mode": args.mode,
        "replicas": topo.replicas,
        "workers": topo.workers,
        "step_ms": 1000 * statistics.median(times[args.warmup:]),
        "allreduce_ms": allreduce_ms,
        "params": params,
        "steps": len(times),
    })  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(args) -> dict:
    """Starts 2 loopback workers with TF_CONFIG; returns the chief's result."""
    hosts = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "3"}
        cmd = [sys.executable, __file__, "--worker", "--mode", "workers", *worker_args(args)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=common.REPO))  # fmt: skip
    outs = [p.communicate(timeout=args.timeout) for p in procs]
    lines = [line for line in outs[0][0].splitlines() if line.startswith("{")]
    if procs[0].returncode or not lines:
        return {"error": " | ".join(outs[0][1].strip().splitlines()[-3:])}
    return json.loads(lines[-1])


def worker_args(args) -> list[str]:
    return ["--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, default="none", help=argparse.SUPPRESS)
    p.add_argument("--config", default="000", choices=sorted(common.CONFIGS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60, help="steps per mode per round")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the median")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    rounds = []
    for r in range(args.rounds):
        row = {}
        for mode in MODES:
            if mode == "workers":
                row[mode] = run_workers(args)
            else:
                row[mode] = common.run_worker(
                    "distribute_speed.py", ["--worker", "--mode", mode, *worker_args(args)],
                    args.timeout,
                )  # fmt: skip
            print(f"round {r + 1} {mode}: {row[mode]}", flush=True)
        rounds.append(row)

    shape = common.CONFIGS[args.config]
    chars = shape["batch_size"] * shape["seq_length"]
    print(f"\nconfig {args.config} {shape}, {args.steps} steps per mode per round, "
          f"{args.rounds} rounds; machine: {common.machine()}")  # fmt: skip
    print(
        "| mode | replicas | step ms (median of rounds) | steps/s | chars/s | vs none "
        "| all-reduce ms per step |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary = {}
    for mode in MODES:
        ok = [row[mode] for row in rounds if "error" not in row[mode]]
        if not ok:
            print(f"| {mode} | failed: {rounds[0][mode].get('error')} |")
            continue
        step = statistics.median(x["step_ms"] for x in ok)
        ar = [x["allreduce_ms"] for x in ok if x["allreduce_ms"] is not None]
        summary[mode] = {"step_ms": step, "allreduce_ms": statistics.median(ar) if ar else None,
                         "params": ok[0]["params"]}  # fmt: skip
    for mode, s in summary.items():
        ratio = summary["none"]["step_ms"] / s["step_ms"] if "none" in summary else float("nan")
        ar = f"{s['allreduce_ms']:.2f}" if s["allreduce_ms"] is not None else "-"
        print(f"| {mode} | {2 if mode != 'none' else 1} | {s['step_ms']:.1f} | "
              f"{1000 / s['step_ms']:.2f} | {chars * 1000 / s['step_ms']:,.0f} | "
              f"{ratio:.2f} | {ar} |")  # fmt: skip
    common.RESULTS.mkdir(exist_ok=True)
    out = common.RESULTS / f"distribute_speed_{args.config}.json"
    out.write_text(json.dumps({"rounds": rounds, "summary": summary, "args": vars(args)}, indent=1))
    print(f"\nparams: {next(iter(summary.values()))['params']:,}; results in {out}")


if __name__ == "__main__":
    main()
