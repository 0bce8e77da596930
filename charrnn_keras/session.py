"""Setting up a training session: ``prepare`` checks the request and writes nothing, ``start``
sets up the run directory (new, resumed or replaced), the model, the backup and the callbacks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from charrnn_keras import corpus as corpus_lib
from charrnn_keras import data as data_lib
from charrnn_keras.backup import RunBackup
from charrnn_keras.callbacks import (
    PeriodicCheckpoint,
    Progress,
    ResetStates,
    SampleText,
    TimeBudget,
)
from charrnn_keras.config import Config
from charrnn_keras.distribute import SINGLE, Topology, distributed_dataset
from charrnn_keras.errors import ConfigError, option
from charrnn_keras.forwarding import AveragedWeights, WholeEpochs
from charrnn_keras.model import build_model, compile_model, compute_path
from charrnn_keras.replicas import building, use_scope_strategy
from charrnn_keras.resume import (
    check_replaceable,
    check_resume,
    resolve_run_dir,
    staged_replacement,
)
from charrnn_keras.rundir import RunDir, Status
from charrnn_keras.sampling import Sampler
from charrnn_keras.sizing import check_fits

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
        topology: where training runs (distribute.py).
    """

    cfg: Config
    run: RunDir
    corpus: corpus_lib.Corpus
    replace: bool
    locked: bool
    topology: Topology = SINGLE


def prepare(
    cfg, data, run_dir, overwrite, config_name, held: contextlib.ExitStack, topology=SINGLE
) -> Plan:
    """Checks the run directory, corpus and sizes; writes nothing but the run's lock.

    A worker other than the chief of a multi-worker run only loads and checks the corpus: the
    run directory is the chief's.

    Args:
        cfg, data, run_dir, overwrite, config_name: as for ``train``.
        held: takes the run's lock when the directory exists, so that a second process using
            it is refused before anything is read.
        topology: from ``distribute.make_topology``.

    Returns:
        A Plan.
    """
    if topology.workers > 1 and run_dir is None:
        raise ConfigError(
            f"train.distribute = multi_worker needs {option('run_dir')}: the same directory "
            f"on every worker, on storage they share (the chief writes it, all resume from it)"
        )
    run = RunDir(resolve_run_dir(run_dir, config_name, overwrite))
    d = cfg.data
    if not topology.is_chief:
        corpus = corpus_lib.load_corpus(data, d.max_chars, cache_dir=None)
    else:
        locked = run.path.is_dir()
        if locked:
            held.enter_context(run.lock())
        replace = overwrite and not run.is_empty()
        if replace:
            check_replaceable(run, data)
        corpus = corpus_lib.load_corpus(data, d.max_chars, cache_dir=run.path.parent / ".cache")
    corpus_lib.check_vocab(corpus)
    data_lib.check_size(len(corpus.ids), d.batch_size, d.seq_length, d.val_fraction)
    check_fits(cfg, len(corpus.vocab))  # before the run directory exists: nothing half made
    if not topology.is_chief:
        return Plan(cfg, run, corpus, False, False, topology)
    if not replace and run.config_file.exists():
        check_resume(run, cfg, corpus)
    return Plan(cfg, run, corpus, replace, locked, topology)


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
        topology: where training runs.
        steps, val_steps: batches per epoch of each split (``val_steps`` 0 without one).
        home: the run directory the user named: ``run``, except on a worker other than the
            chief, whose ``run`` is scratch space.
        sampler: the per-epoch sample's Sampler, if there is one (the final sample reuses it
            and its traced draw).
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
    topology: Topology = SINGLE
    steps: int = 0
    val_steps: int = 0
    home: object = None
    sampler: object = None


def start(plan: Plan, held: contextlib.ExitStack, extra_callbacks=()) -> Session:
    """Builds the model, sets up the run directory and restores the backup.

    A run being replaced is replaced only here, once the new one is set up. A worker other
    than the chief writes to scratch space (removed when ``held`` closes) and restores the
    chief's backup.

    Args:
        plan: from ``prepare``.
        held: takes the run's lock if ``prepare`` could not.
        extra_callbacks: as for ``train``.

    Returns:
        A Session.
    """
    cfg, run, corpus, d, topology = plan.cfg, plan.run, plan.corpus, plan.cfg.data, plan.topology
    keras.utils.set_random_seed(cfg.train.seed)
    train_ids, val_ids = data_lib.split(corpus.ids, d.val_fraction)
    datasets = [(train_ids, True), (val_ids, d.val_fraction > 0)]
    if topology.strategy is None:
        (train_ds, steps), (val_ds, val_steps) = [
            data_lib.make_dataset(ids, d.batch_size, d.seq_length) if wanted else (None, 0)
            for ids, wanted in datasets
        ]
    else:
        (train_ds, steps), (val_ds, val_steps) = [
            distributed_dataset(topology, ids, d.batch_size, d.seq_length) if wanted else (None, 0)
            for ids, wanted in datasets
        ]
    logger.info(
        "%s: %s characters, vocabulary %d, %d steps per epoch",
        corpus.source,
        f"{len(corpus.ids):,}",
        len(corpus.vocab),
        steps,
    )
    with building(topology):
        model = build_model(
            cfg.model, len(corpus.vocab), d.batch_size // topology.replicas, d.seq_length,
            vocab=corpus.vocab,
        )  # fmt: skip
        compile_model(model, cfg.train, distributed=topology.strategy is not None)
    use_scope_strategy(model, topology)

    info = {
        "status": Status.RUNNING,
        "data": corpus_lib.describe(corpus),
        "versions": {"python": platform.python_version(), "keras": keras.__version__},
        # What ran, which the config alone does not say ("auto", 0 threads).
        "compute": {
            **compute_path(cfg.model),
            # 0 is TensorFlow's default: a thread per core in each pool.
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()
            or os.cpu_count(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()
            or os.cpu_count(),
            "distribute": cfg.train.distribute,
            "replicas": topology.replicas,
            "workers": topology.workers,
        },
    }
    home = run
    if not topology.is_chief:
        scratch = tempfile.mkdtemp(prefix=f"charrnn-worker{topology.worker}-")
        held.callback(shutil.rmtree, scratch, ignore_errors=True)
        run = RunDir(scratch)
        run.create(cfg, corpus.vocab, info)
    elif plan.replace:
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
    # newest is damaged). Every worker restores the chief's backup.
    backup = RunBackup(run.backup, replicas=topology.replicas, restore_from=home.backup)
    backup.set_model(model)
    with topology.scope():
        first_epoch = backup.restore()
    run.truncate_history(first_epoch)
    run.remove_checkpoints_after(first_epoch * steps)
    best_so_far, _ = run.history_best()
    budget = TimeBudget(cfg.train.max_minutes)
    sampler = (
        Sampler(cfg.model, corpus.vocab) if cfg.train.sample_chars and topology.is_chief else None
    )
    callbacks = [
        *extra_callbacks,
        *_callbacks(
            cfg, run, sampler, (val_ds, val_steps), steps, best_so_far, budget, topology
        ),  # fmt: skip
        backup,  # last: see RunBackup
    ]
    return Session(cfg, run, model, train_ds, val_ds, first_epoch, backup, budget, callbacks,
                   topology=topology, steps=steps, val_steps=val_steps, home=home.path,
                   sampler=sampler)  # fmt: skip


def _callbacks(cfg: Config, run: RunDir, sampler, val, steps: int, best_so_far, budget, topology):
    """Returns the run's callbacks but the backup, in the order they must run.

    ``val`` is ``(validation dataset or None, its steps)``. ``best_so_far`` is the best loss of
    earlier sessions of a resumed run, so that the best checkpoint is only replaced by a
    better one. Every worker runs the same callbacks (a validation is a collective), except
    the per-epoch sample, which only the chief writes: ``sampler`` writes it, None for none.
    """
    t = cfg.train
    val_ds, val_steps = val
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
                t.checkpoint_every,
                run.checkpoints,
                cfg.model.rnn_size,
                val_ds,
                steps,
                topology=topology,
                val_steps=val_steps,
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
    if sampler is not None:
        records.append(
            SampleText(
                sampler,
                min(t.sample_chars, 200),
                log_dir=run.logs / "samples",
                seed=t.seed,
                temperature=SAMPLE_TEMPERATURE,
            )
        )
    # With train.ema the records (and the validation they log) are of the averaged weights.
    callbacks.append(AveragedWeights([WholeEpochs(records)]) if t.ema else WholeEpochs(records))
    return callbacks
