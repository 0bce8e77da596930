"""Exported ``generate`` speed: this tree's export against an older commit's, same weights.

Usage::

    python bench/generation_speed.py                      # against the commit before issue 14
    python bench/generation_speed.py --base HEAD~3 --windows 9 --chars 500
    python bench/generation_speed.py --variant bf16:weights_dtype=bfloat16

One random-weight 2 x 512 run (speed does not depend on the weights) is exported by the
``--base`` commit's code (``git archive`` into a temporary folder, exported in a subprocess)
and by this tree's, plus any ``--variant`` (``name:key=value,...``: ``export_run`` keyword
arguments, and ``intra=N``, the Session's intra-op threads). Every export is loaded in a
process of its own (TensorFlow gives all Sessions of a process the first one's intra-op pool)
in a graph-mode ``tf.compat.v1`` Session with the ``serve`` tag, as TF Serving loads it: the
base with TensorFlow's default threads, as ``charrnn serve`` ran it before issue 14; "new"
with ``charrnn serve``'s threads now (``servable.INTRA_OP_THREADS``); "new, default threads"
with the base's, which separates the export's gain from the threads'. Each window times one
``generate`` call of ``--chars`` characters per row for every export in turn (the order
rotating; the other processes wait, idle), so the machine's drift hits all alike; the table
gives medians, and the ratio to the base is the median of the windows' ratios. It also checks
that the float32 exports write the base's text byte for byte.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import common  # noqa: E402
import serving_speed as speed  # noqa: E402
import tensorflow as tf  # noqa: E402

from charrnn_keras.export import export_run  # noqa: E402
from charrnn_keras.serving import names  # noqa: E402
from charrnn_keras.serving.servable import INTRA_OP_THREADS  # noqa: E402

# The last commit before issue 14's generation work: "today's" export.
BASE = "a56f0f3"


def export_base(commit: str, run_dir: Path, out: Path, workdir: Path) -> Path:
    """Exports ``run_dir`` with the package as it was at ``commit``; returns the version dir."""
    src = workdir / "base_src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(common.REPO), "archive", commit, "charrnn_keras"],
                             check=True, capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    # A copy of the run whose config.toml keeps only the keys the base knows: keys added since
    # (model.lstm_loop, model.init, ...) choose how training runs, not what the weights compute.
    code = """
import dataclasses, re, shutil, sys
from pathlib import Path
from charrnn_keras import config
from charrnn_keras.export import export_run
run = Path(sys.argv[3])
shutil.copytree(sys.argv[1], run)
sections = config._sections().items()
known = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in sections}
lines, section = [], None
for line in (run / "config.toml").read_text().splitlines():
    if m := re.match(r"\\[(\\w+)\\]", line):
        section = m.group(1)
    elif (m := re.match(r"(\\w+) =", line)) and m.group(1) not in known.get(section, ()):
        continue
    lines.append(line)
(run / "config.toml").write_text("\\n".join(lines) + "\\n")
print(export_run(run, sys.argv[2], "charrnn"))
"""
    env = {**os.environ, "PYTHONPATH": str(src)}
    argv = [sys.executable, "-c", code, str(run_dir), str(out), str(workdir / "base_run")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=workdir)
    if proc.returncode:
        sys.exit(f"exporting with {commit}'s package failed:\n{proc.stderr[-2000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def worker(path: str, intra: int) -> None:
    """The process of one export: loads it, then answers ``batch chars`` lines on stdin with
    ``{"seconds": ..., "text": md5}`` of one timed generate call (after an untimed first)."""
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=intra)
    session = tf.compat.v1.Session(graph=tf.Graph(), config=config)
    with session.graph.as_default():
        meta = tf.compat.v1.saved_model.loader.load(session, [names.SERVE_TAG], path)
    sig = meta.signature_def[names.GENERATE]
    fetch = sig.outputs[names.TEXT].name
    feeds = {k: v.name for k, v in sig.inputs.items()}
    warm = set()
    print("ready", flush=True)
    for line in sys.stdin:
        batch, chars = map(int, line.split())
        feed = {feeds[k]: v for k, v in speed.generate_inputs(batch, chars).items()}
        if (batch, chars) not in warm:
            session.run(fetch, feed)
            warm.add((batch, chars))
        start = time.perf_counter()
        text = session.run(fetch, feed)
        seconds = time.perf_counter() - start
        digest = hashlib.md5(b"\0".join(text.ravel().tolist())).hexdigest()
        print(json.dumps({"seconds": seconds, "text": digest}), flush=True)


class Runner:
    """One export served by a ``worker`` process with ``intra`` intra-op threads."""

    def __init__(self, path: Path, intra: int):
        cmd = [sys.executable, __file__, "--worker", str(path), str(intra)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the worker for {path} did not start")

    def __call__(self, batch: int, chars: int) -> dict:
        self.proc.stdin.write(f"{batch} {chars}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def parse_variant(spec: str) -> tuple[str, dict]:
    """``name:key=value,...`` -> (name, export_run keyword arguments); values are Python
    literals (``False``, ``3``) or else strings."""
    name, _, rest = spec.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=", 1)
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return name, kwargs


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2], int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=BASE, help="the commit to compare against")
    parser.add_argument("--chars", type=int, default=500)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument("--variant", action="append", default=[], help="name:key=value,...")
    parser.add_argument("--base-intra", type=int, default=0,
                        help="the base's intra-op threads (0: TensorFlow's default)")  # fmt: skip
    args = parser.parse_args()
    print(f"machine: {common.machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        speed.make_export(tmp, 512)
        run_dir = tmp / "run"
        base = export_base(args.base, run_dir, tmp / "base", tmp)
        new = export_run(run_dir, tmp / "new", speed.MODEL)
        specs = {"base": (base, args.base_intra), "new": (new, INTRA_OP_THREADS),
                 "new, default threads": (new, 0)}  # fmt: skip
        for spec in args.variant:
            name, kwargs = parse_variant(spec)
            intra = kwargs.pop("intra", INTRA_OP_THREADS)
            specs[name] = (export_run(run_dir, tmp / name, speed.MODEL, **kwargs) if kwargs
                           else new, intra)  # fmt: skip
        runners = {name: Runner(path, intra) for name, (path, intra) in specs.items()}
        try:
            rows = [measure(runners, batch, args.chars, args.windows) for batch in args.batches]
        finally:
            for runner in runners.values():
                runner.close()
    print_table(rows, list(runners), args)
    common.emit({"machine": common.machine(), "args": vars(args), "rows": rows})


def measure(runners: dict, batch: int, chars: int, windows: int) -> dict:
    """Interleaved windows at one batch size; returns chars/s per export and window."""
    texts = {name: run(batch, chars)["text"] for name, run in runners.items()}
    same = {name: t == texts["base"] for name, t in texts.items()}
    rates = {name: [] for name in runners}
    names_ = list(runners)
    for w in range(windows):
        for name in names_[w % len(names_) :] + names_[: w % len(names_)]:
            rates[name].append(batch * chars / runners[name](batch, chars)["seconds"])
    print(f"batch {batch}: " + ", ".join(f"{n} {statistics.median(r):,.0f}"
                                         for n, r in rates.items()), flush=True)  # fmt: skip
    return {"batch": batch, "chars": chars, "rates": rates, "same_text": same,
            "loadavg_1min": os.getloadavg()[0]}  # fmt: skip


def print_table(rows: list, names_: list, args) -> None:
    print(f"\n2 x 512, generate {args.chars} chars/row, {args.windows} interleaved windows, "
          f"base {args.base}\n")  # fmt: skip
    print("| batch | export | chars/s min | median | max | x base (median of windows) "
          "| same text as base |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---|")
    for row in rows:
        base = row["rates"]["base"]
        for name in names_:
            r = row["rates"][name]
            ratio = statistics.median(a / b for a, b in zip(r, base, strict=True))
            print(f"| {row['batch']} | {name} | {min(r):,.0f} | {statistics.median(r):,.0f} | "
                  f"{max(r):,.0f} | {ratio:.2f} | {row['same_text'][name]} |")  # fmt: skip


if __name__ == "__main__":
    main()
