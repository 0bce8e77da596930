"""Where an epoch's wall time goes besides its training steps (issue 14).

Usage::

    python bench/epoch_gaps.py                          # this tree, 3 epochs
    python bench/epoch_gaps.py --tree /tmp/before       # and another checkout, one after the other
    python bench/epoch_gaps.py --set model.rnn_size=512 --chars 0   # the config as it is

It trains ``--config`` (default configs/shakespeare_fast.toml, made smaller by ``--set``) on the
first ``--chars`` characters of tinyshakespeare with ``charrnn_keras.train.train`` in a fresh
process per tree (that tree's package on PYTHONPATH), with a Keras callback that timestamps
every hook. Per epoch it reports the wall time (from one epoch's start to the next's, or to the
end of ``fit``), the time inside training steps (``on_train_batch_begin`` to ``_end``; Keras
waits for each step there, as a callback that is not async-safe makes it), their fraction, and
the rest:

- first_step_wait: epoch start to the first step (the iterator made, its first batches);
- between_steps: every gap between one step's end and the next's start;
- to_validation: the last step's end to validation's start (or to the epoch end);
- validation: Keras's evaluate pass over the validation split;
- epoch_end: the epoch's end hooks of the run's own callbacks (checkpoint, CSV, TensorBoard,
  the per-epoch sample, the backup) until the next epoch starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

DEFAULT_SET = [
    "model.rnn_size=256",
    "train.epochs=3",
    "train.max_minutes=0",
    "train.sample_chars=200",
]


def worker(args) -> None:
    """Trains in this process and prints the per-epoch figures as one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from charrnn_keras.config import load_config
    from charrnn_keras.train import train

    class Clock(keras.callbacks.Callback):
        """Timestamps of every hook, per epoch (not async-safe: Keras waits for each step)."""

        def __init__(self):
            super().__init__()
            self.epochs = []

        def _now(self, key):
            self.epochs[-1].setdefault(key, []).append(time.perf_counter())

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append({"begin": [time.perf_counter()]})

        def on_train_batch_begin(self, batch, logs=None):
            self._now("step_begin")

        def on_train_batch_end(self, batch, logs=None):
            self._now("step_end")

        def on_test_begin(self, logs=None):
            self._now("val_begin")

        def on_test_end(self, logs=None):
            self._now("val_end")

        def on_epoch_end(self, epoch, logs=None):
            self._now("end")

        def on_train_end(self, logs=None):
            self.finished = time.perf_counter()

    text = Path(args.data).read_text(encoding="utf-8")
    workdir = Path(tempfile.mkdtemp(prefix="charrnn-gaps-"))
    data = workdir / "corpus.txt"
    data.write_text(text[: args.chars] if args.chars else text, encoding="utf-8")
    cfg = load_config(args.config, args.set)
    clock = Clock()
    train(cfg, data=str(data), run_dir=workdir / "run", verbose=0, extra_callbacks=[clock])
    epochs = []
    for i, e in enumerate(clock.epochs):
        until = clock.epochs[i + 1]["begin"][0] if i + 1 < len(clock.epochs) else clock.finished
        begins, ends = e["step_begin"], e["step_end"]
        val = (e["val_end"][0] - e["val_begin"][0]) if "val_begin" in e else 0.0
        after_steps = e.get("val_begin", e["end"])[0]
        row = {
            "wall": until - e["begin"][0],
            "steps": len(begins),
            "in_steps": sum(b - a for a, b in zip(begins, ends, strict=True)),
            "first_step_wait": begins[0] - e["begin"][0],
            "between_steps": sum(b - a for a, b in zip(ends[:-1], begins[1:], strict=True)),
            "slowest_gap": max(
                (b - a for a, b in zip(ends[:-1], begins[1:], strict=True)), default=0.0
            ),  # fmt: skip
            "to_validation": after_steps - ends[-1],
            "validation": val,
            "epoch_end": until - e["end"][0],
        }
        row["fraction"] = row["in_steps"] / row["wall"]
        epochs.append(row)
    common.emit({"epochs": epochs})


def run_tree(tree: Path, args) -> dict:
    """Runs the worker with ``tree``'s package; returns its figures."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", args.config,
           "--data", args.data, "--chars", str(args.chars)]  # fmt: skip
    for item in args.set:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(tree), "KERAS_BACKEND": "tensorflow",
           "TF_CPP_MIN_LOG_LEVEL": "3"}  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["process_s"] = time.monotonic() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(common.REPO / "configs" / "shakespeare_fast.toml"))
    parser.add_argument("--data", default=str(common.DATA))
    parser.add_argument("--chars", type=int, default=300_000, help="0: the whole file")
    parser.add_argument("--set", action="append", help=f"config overrides (default {DEFAULT_SET})")
    parser.add_argument("--tree", action="append", default=[], help="another checkout to time")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.set = DEFAULT_SET if args.set is None else args.set
    if args.worker:
        worker(args)
        return
    results = {}
    for tree in [common.REPO, *(Path(t).resolve() for t in args.tree)]:
        results[str(tree)] = run_tree(tree, args)
        sets = " ".join(f"--set {item}" for item in args.set)
        print(f"{tree}: --config {args.config} --chars {args.chars} {sets}")
        cols = ("wall", "in_steps", "fraction", "first_step_wait", "between_steps",
                "slowest_gap", "to_validation", "validation", "epoch_end")  # fmt: skip
        print("  epoch steps " + " ".join(f"{c:>15s}" for c in cols))
        for i, e in enumerate(results[str(tree)]["epochs"]):
            print(f"  {i + 1:5d} {e['steps']:5d} " + " ".join(f"{e[c]:15.2f}" for c in cols))
    m = common.machine()
    print(f"machine: {m['cpus']} CPUs, {m['cpu']}, load average {m['loadavg_1min']:.2f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": m, "trees": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
