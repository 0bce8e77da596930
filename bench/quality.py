"""Quality in a time budget: validation loss after N minutes of training, ours vs PyTorch.

Usage::

    python bench/quality.py --minutes 30               # ~65 min: ours (onednn-bf16), then torch
    python bench/quality.py --minutes 2 --impls onednn-bf16 fast-bf16 torch   # a short one

Every implementation trains the model of ``--config`` (default configs/shakespeare_fast.toml)
on tinyshakespeare with the last 10% held out, for ``--minutes`` of training wall time, in its
own process: ours through ``build_model``/``compile_model``/``model.fit`` (FastLSTM with
float32 or bf16 matmuls, on TensorFlow ops or oneDNN's fused op, or Keras's LSTM), PyTorch
with ``torch_ref.Trainer`` (same model, loss, Adam, clipping, carried state, per-epoch
learning-rate decay and state reset). Every ``--eval-every`` seconds of training, and at the
end, the clock stops and the whole validation split is scored from a zero state (nats/char;
bits = nats / ln 2). Results go to
``bench/results/quality.json`` and the plot of validation loss against training time to
``bench/results/quality.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import common

DEFAULT_CONFIG = common.REPO / "configs" / "shakespeare_fast.toml"
VAL_FRACTION = 0.1  # the brief: the last 10% of tinyshakespeare


class Clock:
    """Training wall time that stops while validation runs.

    Args:
        budget_s: seconds of training allowed.
        every_s: seconds of training between validations.
    """

    def __init__(self, budget_s: float, every_s: float):
        self.budget_s = budget_s
        self.every_s = every_s
        self.trained = 0.0
        self._since = None
        self.next_eval = min(every_s, budget_s)

    def start(self) -> None:
        self._since = time.monotonic()

    def stop(self) -> None:
        self.trained += time.monotonic() - self._since
        self._since = None

    def elapsed(self) -> float:
        running = time.monotonic() - self._since if self._since is not None else 0.0
        return self.trained + running

    def due(self) -> bool:
        """Whether a validation is due (always at the end of the budget)."""
        return self.elapsed() >= self.next_eval

    def done(self) -> bool:
        return self.elapsed() >= self.budget_s

    def advance(self) -> None:
        """Schedules the next validation after the one just made."""
        marks = math.floor(self.elapsed() / self.every_s) + 1
        self.next_eval = min(marks * self.every_s, self.budget_s)


def _splits():
    from charrnn_keras import data as data_lib

    ids, vocab = common.tinyshakespeare_ids()
    train_ids, val_ids = data_lib.split(ids, VAL_FRACTION)
    return train_ids, val_ids, vocab


def keras_worker(args, cfg) -> dict:
    """Trains one of our implementations for the budget; returns the validation curve."""
    intra, inter, chains, time_chunks = common.parse_tf_threads(args.threads)
    common.set_tf_threads(intra, inter)
    import keras

    from charrnn_keras import data as data_lib
    from charrnn_keras.averaging import averaged_weights
    from charrnn_keras.callbacks import ResetStates, ValidationLoss
    from charrnn_keras.model import build_model, compile_model

    d, t = cfg.data, cfg.train
    train_ids, val_ids, vocab = _splits()
    train_ds, steps = data_lib.make_dataset(train_ids, d.batch_size, d.seq_length)
    val_ds, _ = data_lib.make_dataset(val_ids, d.batch_size, d.seq_length)
    keras.utils.set_random_seed(t.seed)
    settings = common.lstm_settings(args.impl, chains, time_chunks)
    model_cfg = dataclasses.replace(cfg.model, **settings, init=args.init or cfg.model.init)
    model = build_model(model_cfg, vocab, d.batch_size, d.seq_length)
    compile_model(model, dataclasses.replace(t, ema=args.ema) if args.ema else t)
    if args.bias_lr != 1:
        common.scale_bias_lr(model, args.bias_lr)

    validation = ValidationLoss(model, val_ds)

    def evaluate() -> float:
        """The validation loss of the weights, or of their moving average (``train.ema``)."""
        with averaged_weights(model):
            return validation()

    clock = Clock(args.minutes * 60, args.eval_every)
    curve, chars = [], 0

    class Budget(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            clock.start()

        def on_train_batch_end(self, batch, logs=None):
            nonlocal chars
            chars += d.batch_size * d.seq_length
            if clock.due() or clock.done():
                clock.stop()
                curve.append((clock.trained, evaluate(), chars))
                print(f"{args.impl} {clock.trained / 60:6.2f} min {curve[-1][1]:.4f}", flush=True)
                clock.advance()
                if clock.done():
                    self.model.stop_training = True
                else:
                    clock.start()

    model.fit(
        train_ds,
        epochs=t.epochs,
        verbose=0,
        shuffle=False,
        callbacks=[
            ResetStates(),
            keras.callbacks.LearningRateScheduler(lambda e: t.learning_rate * t.lr_decay**e),
            Budget(),
        ],
    )
    return {"curve": curve, "steps_per_epoch": steps}


def torch_worker(args, cfg) -> dict:
    """Trains the PyTorch reference for the budget; returns the validation curve."""
    import torch_ref

    threads, interop = (int(v) for v in args.threads.split(","))
    torch_ref.set_threads(threads, interop)
    d, m, t = cfg.data, cfg.model, cfg.train
    train_ids, val_ids, vocab = _splits()
    xs, ys = torch_ref.batches(train_ids, d.batch_size, d.seq_length)
    vx, vy = torch_ref.batches(val_ids, d.batch_size, d.seq_length)
    trainer = torch_ref.Trainer(
        vocab,
        m.embedding_dim,
        m.rnn_size,
        m.num_layers,
        d.batch_size,
        learning_rate=t.learning_rate,
        grad_clip=t.grad_clip,
        bf16=args.impl == "torch-bf16",
        seed=t.seed,
        dropout=m.dropout,
        weight_decay=t.weight_decay,
        ema=args.ema or t.ema,
    )
    clock = Clock(args.minutes * 60, args.eval_every)
    curve, chars = [], 0
    clock.start()
    for epoch in range(t.epochs):
        for group in trainer.optimizer.param_groups:
            group["lr"] = t.learning_rate * t.lr_decay**epoch
        trainer.reset()
        for x, y in zip(xs, ys, strict=True):
            trainer.train_step(x, y)
            chars += d.batch_size * d.seq_length
            if clock.due() or clock.done():
                clock.stop()
                curve.append((clock.trained, trainer.evaluate(vx, vy), chars))
                print(f"{args.impl} {clock.trained / 60:6.2f} min {curve[-1][1]:.4f}", flush=True)
                clock.advance()
                if clock.done():
                    return {"curve": curve, "steps_per_epoch": len(xs)}
                clock.start()
    clock.stop()
    return {"curve": curve, "steps_per_epoch": len(xs)}


def loss_at(curve, seconds: float):
    """Returns the validation loss measured at ``seconds`` of training (the first at or after)."""
    for trained, loss, _ in curve:
        if trained >= seconds - 1e-6:
            return loss
    return None


def plot(results: dict, path: Path) -> None:
    """Writes validation loss (nats/char) against training minutes, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for impl, r in results["runs"].items():
        if r.get("curve"):
            minutes = [p[0] / 60 for p in r["curve"]]
            ax.plot(minutes, [p[1] for p in r["curve"]], marker=".", label=impl)
    ax.axhline(1.50, color="grey", linestyle="--", linewidth=0.8, label="target 1.50")
    ax.set_xlabel("training wall time (minutes, validation excluded)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(f"tinyshakespeare, {results['config_name']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    """Runs each implementation in its own process; saves the JSON and the plot."""
    from charrnn_keras.config import load_config

    cfg = load_config(args.config)
    results = {
        "machine": common.machine(),
        "config_name": Path(args.config).name,
        "config": cfg.to_dict(),
        "minutes": args.minutes,
        "runs": {},
    }
    for impl in args.impls:
        threads = args.torch_threads if impl.startswith("torch") else args.tf_threads
        threads = args.onednn_threads if impl.startswith("onednn") else threads
        worker_args = ["--worker", "--impl", impl, "--threads", threads]
        worker_args += ["--minutes", str(args.minutes), "--eval-every", str(args.eval_every)]
        worker_args += ["--config", str(args.config)]
        ema = args.ema or cfg.train.ema
        worker_args += ["--ema", str(ema), "--bias-lr", str(args.bias_lr)]
        worker_args += ["--init", args.init] if args.init else []
        timeout = args.minutes * 60 * 2 + 600  # validation and start-up come on top
        r = common.run_worker("quality.py", worker_args, timeout, echo=True)
        r["threads"], r["ema"], r["init"] = threads, ema, args.init or cfg.model.init
        r["bias_lr"] = args.bias_lr
        for mark in sorted({10, 30, args.minutes}):
            if mark <= args.minutes and "curve" in r:
                loss = loss_at(r["curve"], mark * 60)
                r[f"val_loss_{mark:g}min"] = loss
                r[f"val_bpc_{mark:g}min"] = None if loss is None else loss / math.log(2)
        if "curve" in r:
            r["best_val_loss"] = min(p[1] for p in r["curve"])
            r["chars_per_s"] = r["curve"][-1][2] / r["curve"][-1][0]
        summary = {k: v for k, v in r.items() if k != "curve"}
        print(f"{impl}: {summary}", flush=True)
        results["runs"][impl] = r
    common.RESULTS.mkdir(exist_ok=True)
    stem = args.name or ("quality" if args.minutes >= 30 else f"quality_{args.minutes:g}min")
    (common.RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, common.RESULTS / f"{stem}.png")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30, help="training budget per run")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="a charrnn TOML config")
    parser.add_argument("--impls", nargs="+", default=["onednn-bf16", "torch"])
    parser.add_argument("--eval-every", type=float, default=60, help="seconds between evals")
    parser.add_argument(
        "--tf-threads", default="1,2,2,10", help="ours: intra,inter[,chains[,time_chunks]]"
    )
    parser.add_argument("--onednn-threads", default="2,1", help="ours on oneDNN: intra,inter")
    parser.add_argument("--torch-threads", default="2,1", help="PyTorch: threads,interop")
    parser.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="score the weights' moving average (momentum; default: the config's train.ema)",
    )
    parser.add_argument(
        "--init", choices=["keras", "torch"], help="ours: model.init (default: the config's)"
    )
    parser.add_argument(
        "--bias-lr", type=float, default=1.0, help="ours: the LSTM biases' learning rate factor"
    )
    parser.add_argument("--name", help="results file stem under bench/results (default: quality)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--threads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from charrnn_keras.config import load_config

        cfg = load_config(args.config)
        worker = torch_worker if args.impl.startswith("torch") else keras_worker
        common.emit(worker(args, cfg))
    else:
        run(args)


if __name__ == "__main__":
    main()
