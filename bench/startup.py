"""Where the seconds of ``charrnn sample -n 200`` go (issue 14): start-up, not drawing.

Usage::

    python bench/startup.py                       # this tree, 5 runs
    python bench/startup.py --runs 7 --tree /tmp/before   # also another checkout, interleaved

It trains a tiny 2 x 128 run in a temporary directory (one epoch of 20 kB of tinyshakespeare),
then runs the real CLI, ``charrnn sample --run-dir RUN -n 200``, in fresh processes, the trees
taking turns run by run so that a change in the machine's load falls on both alike. Each run's
process records when its phases end, measured from the parent's clock just before it started:

- imports: Python's start, the CLI and ``charrnn_keras.sampling`` (TensorFlow and Keras);
- model: ``Sampler.from_run_dir`` (the 1x1 model built and its weights loaded);
- first chunk: from ``generate`` to its first character (tracing the compiled draw);
- drawing: the other characters;
- exit: from ``main``'s return until the parent sees the process end.

Medians (and min, max) per tree are printed, with the machine's facts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import common

CONFIG = """
[data]
batch_size = 8
seq_length = 32
val_fraction = 0.1
[model]
cell = "lstm"
embedding_dim = 128
rnn_size = 128
num_layers = 2
dropout = 0.0
[train]
epochs = 1
learning_rate = 0.002
seed = 1
sample_chars = 20
"""

# Runs in the measured process: marks the phases by wrapping Sampler once its module has
# loaded (an import hook, so that nothing is imported earlier than the CLI imports it), then
# runs the CLI's main() as the console script does.
DRIVER = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, os, sys, time
    T0 = float(os.environ["STARTUP_T0"])
    marks = {}

    def mark(name):
        marks.setdefault(name, time.time() - T0)

    def wrap(module):
        Sampler = module.Sampler
        load = Sampler.from_run_dir.__func__
        def from_run_dir(cls, *a, **k):
            mark("imports")
            try:
                return load(cls, *a, **k)
            finally:
                mark("model")
        Sampler.from_run_dir = classmethod(from_run_dir)
        generate = Sampler.generate
        def timed_generate(self, *a, **k):
            first = True
            for char in generate(self, *a, **k):
                if first:
                    mark("first_chunk")
                    first = False
                yield char
            mark("drawing")
        Sampler.generate = timed_generate

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "charrnn_keras.sampling":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module
            def exec_and_wrap(module):
                exec_module(module)
                wrap(module)
            spec.loader.exec_module = exec_and_wrap
            return spec

    sys.meta_path.insert(0, Hook())
    from charrnn_keras import cli
    sys.argv = ["charrnn", *sys.argv[1:]]
    code = cli.main()
    mark("main")
    sys.stderr.write("STARTUP " + json.dumps(marks) + "\\n")
    sys.exit(code)
    """
)

PHASES = ("imports", "model", "first_chunk", "drawing", "exit")


def train_run(tree: Path, workdir: Path, data: Path) -> Path:
    """Trains the tiny 2 x 128 run with ``tree``'s CLI on ``data``'s first 20 kB; returns its
    run directory."""
    text = workdir / "small.txt"
    text.write_bytes(data.read_bytes()[:20000])
    config = workdir / "tiny128.toml"
    config.write_text(CONFIG)
    run_dir = workdir / "run"
    subprocess.run(
        [sys.executable, "-m", "charrnn_keras.cli", "train", "--config", str(config),
         "--data", str(text), "--run-dir", str(run_dir), "-q"],
        check=True, capture_output=True, env=_env(tree), cwd=workdir,
    )  # fmt: skip
    return run_dir


def _env(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree), "KERAS_BACKEND": "tensorflow"}


def time_once(tree: Path, run_dir: Path, num_chars: int) -> dict:
    """Runs ``charrnn sample`` once with ``tree``'s package; returns seconds per phase."""
    start = time.time()
    env = {**_env(tree), "STARTUP_T0": repr(start)}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, "sample", "--run-dir", str(run_dir), "-n", str(num_chars)],
        capture_output=True, text=True, env=env, cwd=run_dir.parent,
    )  # fmt: skip
    total = time.time() - start
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("STARTUP ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"charrnn sample failed ({proc.returncode}): {proc.stderr[-2000:]}")
    marks = json.loads(lines[-1].split(" ", 1)[1])
    ends = [marks[p] for p in PHASES[:-1]] + [total]
    starts = [0.0, *ends[:-1]]
    phases = {p: end - start for p, start, end in zip(PHASES, starts, ends, strict=True)}
    phases["total"] = total
    return phases


def summarise(runs: list[dict]) -> dict:
    """Median, min and max of each phase over runs."""
    return {
        k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
            "max": max(r[k] for r in runs)}
        for k in (*PHASES, "total")
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--chars", type=int, default=200)
    parser.add_argument(
        "--tree", action="append", default=[], help="another checkout to time beside this one"
    )
    parser.add_argument("--data", type=Path, default=common.DATA, help="tinyshakespeare.txt")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    trees = [common.REPO, *(Path(t).resolve() for t in args.tree)]
    with tempfile.TemporaryDirectory(prefix="charrnn-startup-") as tmp:
        run_dir = train_run(common.REPO, Path(tmp), args.data)
        runs = {str(t): [] for t in trees}
        for _ in range(args.runs):
            for tree in trees:
                runs[str(tree)].append(time_once(tree, run_dir, args.chars))
    result = {"machine": common.machine(), "nproc": os.cpu_count(), "chars": args.chars,
              "runs": args.runs, "trees": {t: summarise(r) for t, r in runs.items()}}  # fmt: skip
    for tree, phases in result["trees"].items():
        print(f"{tree}  (median [min-max] s over {args.runs} runs)")
        for name, s in phases.items():
            print(f"  {name:12s} {s['median']:6.2f}  [{s['min']:.2f}-{s['max']:.2f}]")
    m = result["machine"]
    print(f"machine: {m['cpus']} CPUs, {m['cpu']}, load average {m['loadavg_1min']:.2f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
