"""Training: choose or resume the run directory, build the pipeline and model, ``fit``.

Re-running the same command after a crash or Ctrl-C resumes the unfinished run from its last
backup (weights, optimizer state, epoch counter); a finished run is never overwritten.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import keras

from charrnn_keras import data as data_lib
from charrnn_keras import rundir as rd
from charrnn_keras.callbacks import PeriodicCheckpoint, ResetStates, SampleText, TimeBudget
from charrnn_keras.config import Config
from charrnn_keras.errors import CharRNNError
from charrnn_keras.model import build_model, compile_model
from charrnn_keras.vocab import VOCAB_FILE, Vocab

logger = logging.getLogger(__name__)

SAMPLE_TEMPERATURE = 0.8  # a little below 1: end-of-run samples read better, still varied


class TrainingInterrupted(CharRNNError):
    """Ctrl-C during training; the message says how to resume."""

    exit_code = 130  # what a shell reports for a process stopped by SIGINT


@dataclass
class TrainResult:
    """What a finished ``train`` call reports.

    Args:
        run_dir: the run directory.
        best_val_loss: lowest validation loss in nats/char (train loss if no validation split).
        best_val_bpc: the same in bits/char.
        epochs_done: epochs completed over all sessions of the run.
        sample: a short sample from the best weights ("" if disabled).
        stopped_early: why training stopped before ``epochs``, or "".
    """

    run_dir: Path
    best_val_loss: float | None
    best_val_bpc: float | None
    epochs_done: int
    sample: str
    stopped_early: str


def resolve_run_dir(run_dir, config_name: str, overwrite: bool) -> Path:
    """Picks the run directory: the given one, or ``runs/<config_name>[-N]``.

    Without ``run_dir``, the newest ``runs/<config_name>*`` is resumed if unfinished, and a
    new numbered one is started after a finished one.

    Returns:
        The directory to train in (may not exist yet).
    """
    if run_dir is None:
        base = Path("runs") / config_name
        candidates = [base] + [base.with_name(f"{base.name}-{n}") for n in range(2, 10_000)]
        existing = [c for c in candidates if c.exists()]
        if not existing:
            return base
        last = max(existing, key=candidates.index)
        if rd.read_run_info(last).get("status") != "finished" or overwrite:
            return resolve_run_dir(last, config_name, overwrite)
        return candidates[candidates.index(last) + 1]
    run_dir = Path(run_dir)
    info = rd.read_run_info(run_dir)
    if info.get("status") == "finished":
        if not overwrite:
            raise CharRNNError(
                f"{run_dir} holds a finished run; pass --overwrite to replace it, "
                f"or choose another --run-dir"
            )
        shutil.rmtree(run_dir)
    elif run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    elif run_dir.is_file() or (
        run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / rd.CONFIG_FILE).exists()
    ):
        raise CharRNNError(f"{run_dir} exists and is not a run directory; choose another --run-dir")
    return run_dir


def _check_resume(run_dir: Path, cfg: Config, corpus: data_lib.Corpus) -> None:
    """Refuses to resume a run whose model, data layout or corpus differ from this one."""
    old_cfg, old_vocab = rd.load_run(run_dir)
    diffs = [
        f"{section}.{key}: {old!r} -> {new!r}"
        for section in ("data", "model")
        for key, old in old_cfg.to_dict()[section].items()
        if (new := cfg.to_dict()[section][key]) != old
    ]
    old_digest = rd.read_run_info(run_dir).get("data", {}).get("sha256")
    if old_digest and old_digest != corpus.digest:
        diffs.append(f"corpus: {corpus.source} is not the text the run started on")
    elif old_vocab != corpus.vocab:
        diffs.append(f"vocabulary: {len(old_vocab)} -> {len(corpus.vocab)} characters")
    if diffs:
        raise CharRNNError(
            f"cannot resume {run_dir}: it was started with different settings ("
            + "; ".join(diffs)
            + "); use the same settings, another --run-dir, or --overwrite"
        )


def _truncate_history(path: Path, first_epoch: int) -> None:
    """Drops CSV rows for epochs a resumed run will train again, so each epoch appears once."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < first_epoch]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(kept)


def _history_best(path: Path) -> tuple[float | None, int]:
    """Returns (best val_loss or loss, number of epochs) from the CSV history."""
    if not path.exists():
        return None, 0
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    key = "val_loss" if rows and "val_loss" in rows[0] else "loss"
    losses = [float(r[key]) for r in rows if r.get(key) not in (None, "", "nan")]
    return (min(losses) if losses else None), len(rows)


def _backup_epoch(run_dir: Path) -> int:
    meta = run_dir / rd.BACKUP_DIR / "training_metadata.json"
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def train(
    cfg: Config,
    data: str | None = None,
    run_dir=None,
    overwrite: bool = False,
    config_name: str = "default",
    verbose: int = 1,
) -> TrainResult:
    """Trains (or resumes) a run.

    Args:
        cfg: the run's settings.
        data: a UTF-8 file or directory, or None for the built-in corpus.
        run_dir: the run directory, or None for ``runs/<config_name>[-N]``.
        overwrite: replace a finished run in ``run_dir``.
        config_name: names the default run directory.
        verbose: Keras verbosity (1 = progress bar, 0 = silent).

    Returns:
        A TrainResult.
    """
    run_dir = resolve_run_dir(run_dir, config_name, overwrite)
    corpus = data_lib.load_corpus(data, cfg.data.max_chars, cache_dir=run_dir.parent / ".cache")
    d = cfg.data
    data_lib.check_size(len(corpus.ids), d.batch_size, d.seq_length, d.val_fraction)
    resuming = (run_dir / rd.CONFIG_FILE).exists()
    if resuming:
        _check_resume(run_dir, cfg, corpus)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / rd.CONFIG_FILE).write_text(cfg.to_toml(), encoding="utf-8")
    corpus.vocab.save(run_dir / VOCAB_FILE)
    info = {
        "status": "running",
        "data": data_lib.describe(corpus),
        "versions": {"python": platform.python_version(), "keras": keras.__version__},
    }
    data_lib.dump_json(info, run_dir / rd.RUN_FILE)

    keras.utils.set_random_seed(cfg.train.seed)
    train_ids, val_ids = data_lib.split(corpus.ids, d.val_fraction)
    train_ds, steps = data_lib.make_dataset(train_ids, d.batch_size, d.seq_length)
    val_ds = None
    if d.val_fraction > 0:
        val_ds, _ = data_lib.make_dataset(val_ids, d.batch_size, d.seq_length)
    logger.info(
        "%s: %s characters, vocabulary %d, %d steps per epoch",
        corpus.source,
        f"{len(corpus.ids):,}",
        len(corpus.vocab),
        steps,
    )
    model = build_model(cfg.model, len(corpus.vocab), d.batch_size, d.seq_length)
    compile_model(model, cfg.train)
    _truncate_history(run_dir / rd.HISTORY, _backup_epoch(run_dir))
    best_so_far, _ = _history_best(run_dir / rd.HISTORY)
    callbacks, budget = _callbacks(cfg, run_dir, corpus.vocab, val_ds, steps, best_so_far)

    start = time.monotonic()
    try:
        model.fit(
            train_ds,
            epochs=cfg.train.epochs,
            validation_data=val_ds,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,
        )
    except KeyboardInterrupt:
        info["status"] = "interrupted"
        data_lib.dump_json(info, run_dir / rd.RUN_FILE)
        raise TrainingInterrupted(
            f"interrupted; {run_dir} keeps its last backup (epoch {_backup_epoch(run_dir)}). "
            f"Run the same command again to resume"
        ) from None
    if model.stop_training and not budget.expired:
        info["status"] = "failed"
        data_lib.dump_json(info, run_dir / rd.RUN_FILE)
        raise CharRNNError(
            f"training stopped: the loss became NaN. Lower train.learning_rate or "
            f"train.grad_clip; {run_dir} keeps its checkpoints"
        )

    best, epochs_done = _history_best(run_dir / rd.HISTORY)
    info.update(
        status="finished",
        epochs_done=epochs_done,
        best_val_loss=best,
        train_seconds_last_session=round(time.monotonic() - start, 1),
    )
    data_lib.dump_json(info, run_dir / rd.RUN_FILE)
    sample = ""
    if cfg.train.sample_chars:
        from charrnn_keras.sampling import Sampler

        sample = Sampler.from_run_dir(run_dir).sample(
            "", cfg.train.sample_chars, temperature=SAMPLE_TEMPERATURE, seed=cfg.train.seed
        )
    stopped = ""
    if budget.expired:
        stopped = f"stopped after train.max_minutes={cfg.train.max_minutes}: time budget spent"
    return TrainResult(
        run_dir=run_dir,
        best_val_loss=best,
        best_val_bpc=None if best is None else best / math.log(2),
        epochs_done=epochs_done,
        sample=sample,
        stopped_early=stopped,
    )


def _callbacks(cfg: Config, run_dir: Path, vocab: Vocab, val_ds, steps: int, best_so_far):
    """Returns (callbacks in the order they must run, the TimeBudget).

    ``best_so_far`` is the best loss of earlier sessions of a resumed run, so that the best
    checkpoint is only replaced by a better one.
    """
    t = cfg.train
    monitor = "val_loss" if val_ds is not None else "loss"
    ckpt_dir = run_dir / rd.CHECKPOINT_DIR
    ckpt_dir.mkdir(exist_ok=True)
    budget = TimeBudget(t.max_minutes)
    callbacks = [
        # First, so that every other callback sees the restored weights and epoch.
        keras.callbacks.BackupAndRestore(str(run_dir / rd.BACKUP_DIR), double_checkpoint=True),
        ResetStates(),
        keras.callbacks.LearningRateScheduler(lambda epoch: t.learning_rate * t.lr_decay**epoch),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.ModelCheckpoint(
            str(ckpt_dir / rd.BEST),
            monitor=monitor,
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=best_so_far,
        ),
        keras.callbacks.CSVLogger(str(run_dir / rd.HISTORY), append=True),
        keras.callbacks.TensorBoard(str(run_dir / rd.LOGS), write_graph=False, profile_batch=0),
        budget,
    ]
    if t.checkpoint_every:
        callbacks.append(
            PeriodicCheckpoint(t.checkpoint_every, ckpt_dir, cfg.model.rnn_size, val_ds, steps)
        )
    if t.sample_chars:
        try:
            from charrnn_keras.sampling import Sampler
        except ImportError:  # the sampler is optional while the package is being built
            Sampler = None
        if Sampler is not None:
            callbacks.append(
                SampleText(
                    Sampler(cfg.model, vocab),
                    min(t.sample_chars, 200),
                    log_dir=run_dir / rd.LOGS / "samples",
                    seed=t.seed,
                    temperature=SAMPLE_TEMPERATURE,
                )
            )
    return callbacks, budget
