"""Training: choose or resume the run directory, build the pipeline and model, ``fit``.

Re-running the same command after a crash or Ctrl-C resumes the unfinished run from its last
backup (weights, optimizer state, epoch counter); a finished run is never overwritten.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from charrnn_keras import data as data_lib
from charrnn_keras import rundir as rd
from charrnn_keras.backup import RunBackup
from charrnn_keras.callbacks import PeriodicCheckpoint, ResetStates, SampleText, TimeBudget
from charrnn_keras.config import Config, TrainConfig
from charrnn_keras.errors import Interrupted, TrainingStopped
from charrnn_keras.model import build_model, check_fits, compile_model
from charrnn_keras.resume import check_resume, history_best, resolve_run_dir, truncate_history
from charrnn_keras.sampling import Sampler
from charrnn_keras.vocab import VOCAB_FILE, Vocab

logger = logging.getLogger(__name__)

SAMPLE_TEMPERATURE = 0.8  # a little below 1: end-of-run samples read better, still varied


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


def apply_threads(cfg: TrainConfig) -> None:
    """Sets TensorFlow's thread pools from ``train.intra_op_threads`` and ``inter_op_threads``.

    TensorFlow fixes its pools when it runs its first op, so a process that already ran one
    (a notebook, a test) keeps its pools and gets a warning naming the environment variable.
    """
    threading = tf.config.threading
    pools = [
        ("intra_op_threads", "TF_NUM_INTRAOP_THREADS",
         threading.get_intra_op_parallelism_threads, threading.set_intra_op_parallelism_threads),
        ("inter_op_threads", "TF_NUM_INTEROP_THREADS",
         threading.get_inter_op_parallelism_threads, threading.set_inter_op_parallelism_threads),
    ]  # fmt: skip
    for key, env, get, set_ in pools:
        wanted = getattr(cfg, key)
        if not wanted or get() == wanted:
            continue
        try:
            set_(wanted)
        except RuntimeError:
            logger.warning(
                "train.%s = %d not applied: TensorFlow already started in this process; "
                "set %s=%d in the environment instead",
                key, wanted, env, wanted,
            )  # fmt: skip


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
    apply_threads(cfg.train)
    run_dir = resolve_run_dir(run_dir, config_name, overwrite)
    corpus = data_lib.load_corpus(data, cfg.data.max_chars, cache_dir=run_dir.parent / ".cache")
    d = cfg.data
    data_lib.check_vocab(corpus)
    data_lib.check_size(len(corpus.ids), d.batch_size, d.seq_length, d.val_fraction)
    check_fits(cfg, len(corpus.vocab))  # before the run directory exists: nothing half made
    resuming = (run_dir / rd.CONFIG_FILE).exists()
    if resuming:
        check_resume(run_dir, cfg, corpus)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "status": "running",
        "data": data_lib.describe(corpus),
        "versions": {"python": platform.python_version(), "keras": keras.__version__},
    }
    # config.toml last: its presence means "resume", and _check_resume needs the other two.
    data_lib.dump_json(info, run_dir / rd.RUN_FILE)
    corpus.vocab.save(run_dir / VOCAB_FILE)
    data_lib.write_text_atomic(cfg.to_toml(), run_dir / rd.CONFIG_FILE)
    for sub in (rd.CHECKPOINT_DIR, rd.BACKUP_DIR):
        rd.remove_stale_temps(run_dir / sub)

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
    model = build_model(
        cfg.model, len(corpus.vocab), d.batch_size, d.seq_length, vocab=corpus.vocab
    )
    compile_model(model, cfg.train)
    # Restored before fit, so that the history and the best checkpoint's threshold match the
    # epoch actually resumed from (the previous epoch's copy, if the newest is damaged).
    backup = RunBackup(run_dir / rd.BACKUP_DIR)
    backup.set_model(model)
    first_epoch = backup.restore()
    truncate_history(run_dir / rd.HISTORY, first_epoch)
    best_so_far, _ = history_best(run_dir / rd.HISTORY)
    callbacks, budget = _callbacks(cfg, run_dir, corpus.vocab, val_ds, steps, best_so_far, backup)

    start = time.monotonic()
    try:
        model.fit(
            train_ds,
            epochs=cfg.train.epochs,
            initial_epoch=first_epoch,
            validation_data=val_ds,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,
        )
    except KeyboardInterrupt:
        info["status"] = "interrupted"
        data_lib.dump_json(info, run_dir / rd.RUN_FILE)
        # The backup is written at epoch ends only, so the epoch in progress is lost.
        raise Interrupted(
            f"interrupted: {run_dir} is backed up after epoch {backup.saved_epoch} of "
            f"{cfg.train.epochs}. Run the same command again to resume from epoch "
            f"{backup.saved_epoch + 1}"
        ) from None
    if model.stop_training and not budget.expired:
        info["status"] = "failed"
        data_lib.dump_json(info, run_dir / rd.RUN_FILE)
        raise TrainingStopped(
            f"training stopped: the loss became NaN. Lower train.learning_rate or "
            f"train.grad_clip and run again to resume from epoch {backup.saved_epoch + 1}, "
            f"the last finite one; {run_dir} keeps its checkpoints"
        )

    best, epochs_done = history_best(run_dir / rd.HISTORY)
    info.update(
        status="finished",
        epochs_done=epochs_done,
        best_val_loss=best,
        train_seconds_last_session=round(time.monotonic() - start, 1),
    )
    data_lib.dump_json(info, run_dir / rd.RUN_FILE)
    backup.discard()  # only now: a kill before the line above resumes with nothing to train
    sample = ""
    if cfg.train.sample_chars:
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


def _callbacks(
    cfg: Config, run_dir: Path, vocab: Vocab, val_ds, steps: int, best_so_far, backup: RunBackup
):
    """Returns (callbacks in the order they must run, the TimeBudget).

    ``best_so_far`` is the best loss of earlier sessions of a resumed run, so that the best
    checkpoint is only replaced by a better one. ``backup`` (already restored) goes last.
    """
    t = cfg.train
    monitor = "val_loss" if val_ds is not None else "loss"
    ckpt_dir = run_dir / rd.CHECKPOINT_DIR
    ckpt_dir.mkdir(exist_ok=True)
    budget = TimeBudget(t.max_minutes)
    callbacks = [
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
        callbacks.append(
            SampleText(
                Sampler(cfg.model, vocab),
                min(t.sample_chars, 200),
                log_dir=run_dir / rd.LOGS / "samples",
                seed=t.seed,
                temperature=SAMPLE_TEMPERATURE,
            )
        )
    # Last: an epoch is backed up only once ModelCheckpoint and CSVLogger have recorded it, so
    # a crash in between retrains that epoch rather than losing its history row.
    callbacks.append(backup)
    return callbacks, budget
