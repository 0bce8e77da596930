"""Setting up a training session: ``prepare`` checks the request and writes nothing, ``start``
sets up the run directory (new, resumed or replaced), the model, the backup and the callbacks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from charrnn_keras import data as data_lib
from charrnn_keras.backup import RunBackup
from charrnn_keras.callbacks import (
    PeriodicCheckpoint,
    Progress,
    ResetStates,
    SampleText,
    TimeBudget,
    WholeEpochs,
)
from charrnn_keras.config import Config
from charrnn_keras.model import build_model, check_fits, compile_model, compute_path
from charrnn_keras.resume import (
    check_replaceable,
    check_resume,
    resolve_run_dir,
    staged_replacement,
)
from charrnn_keras.rundir import RunDir, Status
from charrnn_keras.sampling import Sampler

logger = logging.getLogger(__name__)

SAMPLE_TEMPERATURE = 0.8  # a little below 1: end-of-run samples read better, still varied


@dataclass
class Plan:
    """A checked request to train: ``prepare``'s result; nothing is written yet.

    Args:
        cfg: the run's settings.
        run: the run directory.
        corpus: the loaded, checked corpus.
        replace: whether the run in ``run`` is to be replaced by a new one.
        locked: whether the run's lock is held already (the directory existed).
    """

    cfg: Config
    run: RunDir
    corpus: data_lib.Corpus
    replace: bool
    locked: bool


def prepare(cfg, data, run_dir, overwrite, config_name, held: contextlib.ExitStack) -> Plan:
    """Checks the run directory, corpus and sizes; writes nothing but the run's lock.

    Args:
        cfg, data, run_dir, overwrite, config_name: as for ``train``.
        held: takes the run's lock when the directory exists, so that a second process using
            it is refused before anything is read.

    Returns:
        A Plan.
    """
    run = RunDir(resolve_run_dir(run_dir, config_name, overwrite))
    locked = run.path.is_dir()
    if locked:
        held.enter_context(run.lock())
    replace = overwrite and not run.is_empty()
    if replace:
        check_replaceable(run, data)
    d = cfg.data
    corpus = data_lib.load_corpus(data, d.max_chars, cache_dir=run.path.parent / ".cache")
    data_lib.check_vocab(corpus)
    data_lib.check_size(len(corpus.ids), d.batch_size, d.seq_length, d.val_fraction)
    check_fits(cfg, len(corpus.vocab))  # before the run directory exists: nothing half made
    if not replace and run.config_file.exists():
        check_resume(run, cfg, corpus)
    return Plan(cfg, run, corpus, replace, locked)


@dataclass
class Session:
    """A run set up to ``fit``: ``start``'s result.

    Args:
        cfg: the run's settings.
        run: the run directory.
        model: the compiled model, with the backup restored into it.
        train_ds, val_ds: the datasets (``val_ds`` None without validation).
        first_epoch: the epoch ``fit`` starts at (whole epochs already done).
        backup: the run's RunBackup.
        budget: the TimeBudget callback.
        callbacks: every callback, in the order they run.
        seconds: how long ``fit`` ran (set by ``train.fit_run``).
    """

    cfg: Config
    run: RunDir
    model: keras.Model
    train_ds: object
    val_ds: object
    first_epoch: int
    backup: RunBackup
    budget: TimeBudget
    callbacks: list = field(default_factory=list)
    seconds: float = 0.0


def start(plan: Plan, held: contextlib.ExitStack, extra_callbacks=()) -> Session:
    """Builds the model, sets up the run directory and restores the backup.

    A run being replaced is replaced only here, once the new one is set up.

    Args:
        plan: from ``prepare``.
        held: takes the run's lock if ``prepare`` could not.
        extra_callbacks: as for ``train``.

    Returns:
        A Session.
    """
    cfg, run, corpus, d = plan.cfg, plan.run, plan.corpus, plan.cfg.data
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

    info = {
        "status": Status.RUNNING,
        "data": data_lib.describe(corpus),
        "versions": {"python": platform.python_version(), "keras": keras.__version__},
        # What ran, which the config alone does not say ("auto", 0 threads).
        "compute": {
            **compute_path(cfg.model),
            # 0 is TensorFlow's default: a thread per core in each pool.
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()
            or os.cpu_count(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()
            or os.cpu_count(),
        },
    }
    if plan.replace:
        with staged_replacement(run) as staged:
            held.enter_context(staged.lock())  # the lock file moves into place with the run
            staged.create(cfg, corpus.vocab, info)
    else:
        run.path.mkdir(parents=True, exist_ok=True)
        if not plan.locked:
            held.enter_context(run.lock())
        run.create(cfg, corpus.vocab, info)
    run.remove_stale_temps()

    # Restored before fit, so that the history, the checkpoints and the best checkpoint's
    # threshold match the epoch actually resumed from (the previous epoch's copy, if the
    # newest is damaged).
    backup = RunBackup(run.backup)
    backup.set_model(model)
    first_epoch = backup.restore()
    run.truncate_history(first_epoch)
    run.remove_checkpoints_after(first_epoch * steps)
    best_so_far, _ = run.history_best()
    budget = TimeBudget(cfg.train.max_minutes)
    callbacks = [
        *extra_callbacks,
        *_callbacks(cfg, run, corpus.vocab, val_ds, steps, best_so_far, budget),
        backup,  # last: see RunBackup
    ]
    return Session(cfg, run, model, train_ds, val_ds, first_epoch, backup, budget, callbacks)


def _callbacks(cfg: Config, run: RunDir, vocab, val_ds, steps: int, best_so_far, budget):
    """Returns the run's callbacks but the backup, in the order they must run.

    ``best_so_far`` is the best loss of earlier sessions of a resumed run, so that the best
    checkpoint is only replaced by a better one.
    """
    t = cfg.train
    monitor = "val_loss" if val_ds is not None else "loss"
    callbacks = [
        Progress(),
        ResetStates(),
        keras.callbacks.LearningRateScheduler(lambda epoch: t.learning_rate * t.lr_decay**epoch),
        keras.callbacks.TerminateOnNaN(),
        budget,
    ]
    if t.checkpoint_every:
        callbacks.append(
            PeriodicCheckpoint(
                t.checkpoint_every, run.checkpoints, cfg.model.rnn_size, val_ds, steps
            )  # fmt: skip
        )
    # An epoch cut short by the budget is trained again on resume: recorded, it would appear
    # twice in the history and TensorBoard, and could set the best checkpoint's threshold.
    records = [
        keras.callbacks.ModelCheckpoint(
            str(run.best),
            monitor=monitor,
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=best_so_far,
        ),
        keras.callbacks.CSVLogger(str(run.history), append=True),
        keras.callbacks.TensorBoard(str(run.logs), write_graph=False, profile_batch=0),
    ]
    if t.sample_chars:
        records.append(
            SampleText(
                Sampler(cfg.model, vocab),
                min(t.sample_chars, 200),
                log_dir=run.logs / "samples",
                seed=t.seed,
                temperature=SAMPLE_TEMPERATURE,
            )
        )
    callbacks.append(WholeEpochs(records))
    return callbacks
