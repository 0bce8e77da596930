"""Quality per character on an accelerator: many configs and seeds of the PyTorch reference.

A 30-minute quality run (``bench/quality.py``) on the 2-core CPU answers one question an hour.
``bench/parity.py`` showed that ours trains as the PyTorch reference does once Adam's epsilon
placement and the bias learning rate are aligned, so the reference's curves on a GPU say how a
config and a seed fare per character. Each run gets the characters ours trains in
``--minutes`` on the CPU: ``--cpu-chars-per-s`` (ours, shipped config, BENCHMARKS.md 2) scaled
by the shipped shape's matmul FLOPs per character over the run's.

Usage (a run is ``name:key=value,...`` over the shipped config's keys; ``--seeds`` repeats
each run per seed)::

    python bench/sweep.py --device cuda --seeds 1,2,3 --run shipped: --run d50:dropout=0.5

Prints one line per run (best validation loss, the characters where it fell, the loss at the
budget) and writes every curve to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import common
import tomllib

SHIPPED = common.REPO / "configs" / "shakespeare_fast.toml"
KEYS = {  # key -> (section, type)
    "batch_size": ("data", int),
    "seq_length": ("data", int),
    "embedding_dim": ("model", int),
    "rnn_size": ("model", int),
    "num_layers": ("model", int),
    "dropout": ("model", float),
    "learning_rate": ("train", float),
    "lr_decay": ("train", float),
    "grad_clip": ("train", float),
    "weight_decay": ("train", float),
    "ema": ("train", float),
    "seed": ("train", int),
}


def shipped() -> dict:
    """The shipped config's values of ``KEYS``."""
    cfg = tomllib.loads(SHIPPED.read_text())
    return {k: cfg[section][k] for k, (section, _) in KEYS.items()}


def parse_run(text: str) -> tuple[str, dict]:
    """``name:key=value,...`` -> (name, overrides), types from ``KEYS``."""
    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in KEYS:
            raise SystemExit(f"sweep: unknown key {key!r} in run {text!r}; one of {sorted(KEYS)}")
        try:
            overrides[key] = KEYS[key][1](value)
        except ValueError:
            kind = KEYS[key][1].__name__
            message = f"sweep: {key}={value!r} in run {text!r} is not a valid {kind}"
            raise SystemExit(message) from None
    return name, overrides


def budget_chars(cfg: dict, minutes: float, cpu_chars_per_s: float) -> int:
    base = shipped()
    ratio = common.train_flops_per_char(**base) / common.train_flops_per_char(**cfg)
    return int(minutes * 60 * cpu_chars_per_s * ratio)


def worker(spec: dict) -> None:
    """Trains one run; prints a JSON line per evaluation."""
    import torch
    import torch_ref

    torch.backends.cuda.matmul.allow_tf32 = spec["device"] == "cuda"
    torch.backends.cudnn.allow_tf32 = spec["device"] == "cuda"
    if spec["device"] == "cpu":
        torch_ref.set_threads(spec["threads"])
    from charrnn_keras.data import split

    ids, vocab = common.tinyshakespeare_ids(spec["data"])
    train_ids, val_ids = split(ids, 0.1)
    c, dev = spec["cfg"], spec["device"]
    b, s = c["batch_size"], c["seq_length"]
    xs, ys = (t.to(dev) for t in torch_ref.batches(train_ids, b, s))
    vx, vy = (t.to(dev) for t in torch_ref.batches(val_ids, b, s))
    trainer = torch_ref.Trainer(
        vocab,
        c["embedding_dim"],
        c["rnn_size"],
        c["num_layers"],
        b,
        learning_rate=c["learning_rate"],
        grad_clip=c["grad_clip"],
        bf16=spec["bf16"],
        seed=c["seed"],
        dropout=c["dropout"],
        weight_decay=c["weight_decay"],
        ema=c["ema"],
        device=dev,
    )
    steps = max(1, spec["chars"] // (b * s))
    every = max(1, spec["eval_chars"] // (b * s))
    start, step = time.perf_counter(), 0
    for epoch in range(10**9):
        for group in trainer.optimizer.param_groups:
            group["lr"] = c["learning_rate"] * c["lr_decay"] ** epoch
        trainer.reset()
        for x, y in zip(xs, ys, strict=True):
            trainer.train_step(x, y)
            step += 1
            if step % every == 0 or step == steps:
                val = trainer.evaluate(vx, vy)
                point = {"chars": step * b * s, "val": val, "wall": time.perf_counter() - start}
                print(json.dumps(point), flush=True)
                if step == steps or not math.isfinite(val):
                    return


def summarise(name: str, seed: int, budget: int, curve: list[dict]) -> dict:
    done = bool(curve) and curve[-1]["chars"] >= budget
    best = min(curve, key=lambda p: p["val"]) if curve else None
    return {
        "name": name,
        "seed": seed,
        "budget_chars": budget,
        "complete": done,
        "best": best["val"] if best else None,
        "best_chars": best["chars"] if best else None,
        "final": curve[-1]["val"] if curve else None,
        "wall_s": curve[-1]["wall"] if curve else None,
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], help="name:key=value,...")
    parser.add_argument("--seeds", default="1", help="train seeds of each run that sets none")
    parser.add_argument("--minutes", type=float, default=30.0, help="CPU minutes to match")
    parser.add_argument("--cpu-chars-per-s", type=float, default=34_496.0)
    parser.add_argument("--chars", type=int, help="a fixed budget for every run instead")
    parser.add_argument("--eval-chars", type=int, default=1_000_000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default float32)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (cpu)")
    parser.add_argument("--deadline-s", type=float, default=math.inf, help="stop all then")
    parser.add_argument("--data", default=str(common.DATA))
    parser.add_argument("--out", default=str(common.RESULTS / "sweep.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    queue = []
    for text in args.run or ["shipped:"]:
        name, overrides = parse_run(text)
        seeds = [overrides["seed"]] if "seed" in overrides else args.seeds.split(",")
        for seed in map(int, seeds):
            cfg = {**shipped(), **overrides, "seed": seed}
            chars = args.chars or budget_chars(cfg, args.minutes, args.cpu_chars_per_s)
            spec = {
                "cfg": cfg,
                "chars": chars,
                "eval_chars": args.eval_chars,
                "device": args.device,
                "bf16": args.bf16,
                "threads": args.threads,
                "data": args.data,
            }
            queue.append((name, seed, chars, spec))
    env = {**os.environ, "PYTHONPATH": f"{common.REPO}{os.pathsep}{common.BENCH}"}
    running, results, start = [], [], time.perf_counter()
    while queue or running:
        late = time.perf_counter() - start > args.deadline_s
        while queue and len(running) < args.parallel and not late:
            name, seed, chars, spec = queue.pop(0)
            cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
            running.append((name, seed, chars, proc))
        if late:
            queue.clear()
            for *_, proc in running:
                proc.kill()
        for item in list(running):
            name, seed, chars, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            curve = [json.loads(line) for line in proc.stdout.read().splitlines() if line]
            r = summarise(name, seed, chars, curve)
            results.append(r)
            best = f"{r['best']:.4f} at {r['best_chars'] / 1e6:5.1f}M" if curve else "none"
            final = f"{r['final']:.4f}" if curve else "-"
            print(
                f"{name:16s} seed {seed:2d} budget {chars / 1e6:5.1f}M best {best} "
                f"final {final} {'' if r['complete'] else '(cut) '}rc {proc.returncode} "
                f"{r['wall_s'] or 0:.0f}s",
                flush=True,
            )
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
        time.sleep(0.5)


if __name__ == "__main__":
    main()
