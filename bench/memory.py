"""Memory: peak resident memory of training on a large corpus, against corpus and model size.

Usage::

    python bench/memory.py               # 100 MB corpus, 2 x 128 and 2 x 512; ~6 min
    python bench/memory.py --quick       # 20 MB corpus; ~3 min

Each run is ``charrnn_keras.train.train`` (the real pipeline: corpus reading and encoding
cache, stream layout, tf.data, ``model.fit``, checkpoints) in its own process, on a corpus
made by repeating tinyshakespeare into a temporary file, stopped by ``train.max_minutes``
after a few steps; the process's peak RSS (``ru_maxrss``) is reported. Comparing a 1 MB
corpus with the large one gives the bytes of memory per byte of corpus, which should stay a
small constant; comparing 2 x 128 with 2 x 512 shows what the model adds. Results go to
``bench/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

import common

# (label, 0 for tinyshakespeare itself or None for the big corpus, shape in common.CONFIGS)
RUNS = [
    ("1 MB, 2x128", 0, "000"),
    ("{mb} MB, 2x128", None, "000"),
    ("{mb} MB, 2x512", None, "001"),
]


def make_corpus(path: Path, megabytes: float) -> int:
    """Writes tinyshakespeare repeated to ``megabytes`` MB; returns the size in bytes."""
    text = common.DATA.read_bytes()
    target = int(megabytes * 1e6)
    with path.open("wb") as f:
        written = 0
        while written < target:
            chunk = text[: target - written]
            f.write(chunk)
            written += len(chunk)
    return written


def worker(args) -> dict:
    """Trains for ``args.seconds`` on ``args.data``; returns the peak RSS and steps done."""
    from charrnn_keras import rundir as rd
    from charrnn_keras.config import load_config
    from charrnn_keras.train import train

    shape = common.CONFIGS[args.config]
    overrides = [
        f"data.batch_size={shape['batch_size']}",
        f"data.seq_length={shape['seq_length']}",
        "data.val_fraction=0.01",  # the validation pass would dominate the run time
        f"model.embedding_dim={shape['embedding_dim']}",
        f"model.rnn_size={shape['rnn_size']}",
        f"model.num_layers={shape['num_layers']}",
        "train.epochs=1",
        f"train.max_minutes={args.seconds / 60}",
        "train.sample_chars=0",
    ]
    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, data=args.data, run_dir=Path(tmp) / "run", verbose=0)
        history = (result.run_dir / rd.HISTORY).read_text()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_rss_mb": peak_kib * 1024 / 1e6, "history": history.strip()}


def run(args) -> dict:
    """Makes the corpora, runs each measurement in its own process, saves the results."""
    mb = 20 if args.quick else args.megabytes
    results = {"machine": common.machine(), "corpus_mb": mb, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / f"corpus_{mb}mb.txt"
        make_corpus(big, mb)
        for label, corpus_mb, config in RUNS:
            data = common.DATA if corpus_mb == 0 else big
            corpus_bytes = data.stat().st_size
            wargs = ["--worker", "--data", str(data), "--config", config]
            wargs += ["--seconds", str(args.seconds)]
            r = common.run_worker("memory.py", wargs, timeout=1800)
            r.update(label=label.format(mb=mb), corpus_bytes=corpus_bytes, config=config)
            r.pop("history", None)
            print(f"{r['label']}: {r.get('peak_rss_mb', r.get('error'))}", flush=True)
            results["runs"].append(r)
    ok = [r for r in results["runs"] if "peak_rss_mb" in r]
    if len(ok) == 3:
        small, big128, big512 = ok
        extra = (big128["peak_rss_mb"] - small["peak_rss_mb"]) * 1e6
        results["bytes_per_corpus_byte"] = extra / (big128["corpus_bytes"] - small["corpus_bytes"])
        results["model_mb_2x512_minus_2x128"] = big512["peak_rss_mb"] - big128["peak_rss_mb"]
        print(f"memory per corpus byte: {results['bytes_per_corpus_byte']:.2f} bytes", flush=True)
    common.RESULTS.mkdir(exist_ok=True)
    name = "memory_quick.json" if args.quick else "memory.json"
    (common.RESULTS / name).write_text(json.dumps(results, indent=2) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 20 MB corpus")
    parser.add_argument("--megabytes", type=float, default=100, help="size of the big corpus")
    parser.add_argument("--seconds", type=float, default=15, help="training time per run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        common.emit(worker(args))
    else:
        run(args)


if __name__ == "__main__":
    main()
