"""Training: ``prepare`` (check everything, write nothing) and ``start`` (set up the run
directory and the model), both in session.py, then ``fit_run`` and ``finish`` (record the outcome).

Re-running the same command after a crash, Ctrl-C or a spent time budget resumes the unfinished
run from its last backup (weights, optimizer state, epoch counter); a finished run is replaced
only with ``overwrite``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from charrnn_keras.checkpoints import find_checkpoint, load_weights, periodic_checkpoints
from charrnn_keras.config import Config
from charrnn_keras.distribute import agree, config_facts, make_topology
from charrnn_keras.errors import DistributeError, Interrupted, TrainingStopped
from charrnn_keras.model import lstm_loop
from charrnn_keras.rundir import Status
from charrnn_keras.sampling import Sampler
from charrnn_keras.session import SAMPLE_TEMPERATURE, Session, prepare, start

logger = logging.getLogger(__name__)


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


# One time step of a layer's gate matmuls, in multiply-adds (batch x 4u x (in + u)), below which
# oneDNN's LSTM runs faster as one single-threaded op per core, each on its share of the batch
# rows (native_lstm.op_chains), than as one op on every core, in float32 and bf16 alike: 2 x 128
# at batch 60 (8M) 1.6x in bf16, 1.2x in float32; 2 x 192 at batch 64 (19M) 1.1-1.2x; 2 x 256
# at batch 64 (34M) and 2 x 512 at batch 32 or 100 lost (BENCHMARKS.md, 1).
ONEDNN_SMALL = 24 * 2**20


def thread_pools(cfg: Config, cores: int | None = None) -> tuple[int, int]:
    """The (intra-op, inter-op) thread pools to use: the config's, or from the core count.

    0 keeps TensorFlow's default (one thread per core in each pool), except with FastLSTM:

    - on oneDNN's fused op (``model.lstm_loop``), which runs an intra-op pool's worth of its
      own threads: never TensorFlow's default of both pools at full size, which puts two teams
      on the same cores (3x slower). Large layers get every core for the op and one op at a
      time; small ones (under ``ONEDNN_SMALL`` multiply-adds per step) one thread per op and
      one op per core, each on a share of the batch rows (``native_lstm.op_chains``);
    - with ``chains`` > 1 on TensorFlow ops: the chains are independent ops, so each gets
      ``cores // chains`` threads and they run side by side (on 2 cores, 1 and 2: the fastest
      setting measured there, BENCHMARKS.md, 1).

    Args:
        cfg: the run's settings.
        cores: the CPU count (default: this machine's).

    Returns:
        ``(intra, inter)``; 0 means TensorFlow's default.
    """
    t, m = cfg.train, cfg.model
    intra, inter = t.intra_op_threads, t.inter_op_threads
    if not (m.fast_lstm and m.cell == "lstm"):
        return intra, inter
    cores = cores or os.cpu_count() or 1
    if lstm_loop(m) == "onednn":
        gates = (
            cfg.data.batch_size * 4 * m.rnn_size * (max(m.embedding_dim, m.rnn_size) + m.rnn_size)
        )
        if gates < ONEDNN_SMALL:
            return intra or 1, inter or cores
        return intra or cores, inter or 1
    if m.chains > 1:
        intra = intra or max(1, cores // m.chains)
        inter = inter or m.chains
    return intra, inter


def apply_threads(cfg: Config) -> None:
    """Sets TensorFlow's thread pools (``thread_pools``).

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
    for (key, env, get, set_), wanted in zip(pools, thread_pools(cfg), strict=True):
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
    extra_callbacks=(),
) -> TrainResult:
    """Trains (or resumes) a run.

    Args:
        cfg: the run's settings.
        data: a UTF-8 file or directory, or None for the built-in corpus.
        run_dir: the run directory, or None for ``runs/<config_name>[-N]``.
        overwrite: replace the run in ``run_dir`` (finished or not) with a new one.
        config_name: names the default run directory.
        verbose: Keras verbosity (1 = progress bar, 0 = silent).
        extra_callbacks: Keras callbacks to run before the run's own ones (to observe or
            steer training, e.g. in tests).

    Returns:
        A TrainResult.
    """
    apply_threads(cfg)
    topology = make_topology(cfg)  # before TensorFlow runs an op: it sets up the devices
    with contextlib.ExitStack() as held:  # the run's lock, held until training is recorded
        # Each stage ends with every worker checking that the others got as far and agree,
        # so that none trains alone or waits for one that has stopped.
        with _agreed(topology, {**config_facts(cfg), "corpus sha256": None}) as facts:
            plan = prepare(cfg, data, run_dir, overwrite, config_name, held, topology)
            facts["corpus sha256"] = plan.corpus.digest
        logger.info("%s", topology.describe())  # once the run is checked: a refusal is one line
        with _agreed(topology, {"epoch resumed from": None}) as facts:
            session = start(plan, held, extra_callbacks)
            facts["epoch resumed from"] = session.first_epoch
        fit_run(session, verbose)
        return finish(session)


@contextlib.contextmanager
def _agreed(topology, facts: dict):
    """Runs a stage that fills in ``facts``, then checks them with ``distribute.agree``.

    A worker whose stage fails still takes part (with the facts it has), so that the others
    stop too, and then raises its own error.
    """
    try:
        yield facts
    except Exception:
        agree(topology, facts, failed=True)
        raise
    agree(topology, facts)


def fit_run(session: Session, verbose: int = 1) -> None:
    """Runs ``fit`` from the session's first epoch; Ctrl-C is recorded and raised as Interrupted.

    Args:
        session: from ``start``.
        verbose: Keras verbosity.
    """
    s = session
    began = time.monotonic()
    distributed = s.topology.strategy is not None
    try:
        with s.topology.scope():
            s.model.fit(
                s.train_ds,
                epochs=s.cfg.train.epochs,
                initial_epoch=s.first_epoch,
                validation_data=s.val_ds,
                callbacks=s.callbacks,
                verbose=verbose,
                shuffle=False,
                # A distributed dataset repeats: Keras is told where each epoch ends.
                steps_per_epoch=s.steps if distributed else None,
                validation_steps=s.val_steps if distributed and s.val_steps else None,
            )
    except tf.errors.OpError as e:
        if s.topology.workers == 1:
            raise
        # A worker that died or cannot be reached fails the collectives of all the others. The
        # rerun resumes from the chief's backup, so that is the epoch to name.
        done = s.backup.resumable_epoch()
        s.run.record(Status.INTERRUPTED, epochs_done=done)
        raise DistributeError(
            f"worker {s.topology.worker}: training stopped in epoch {done + 1}: another worker "
            f"stopped or cannot be reached ({type(e).__name__}); run the same command on every "
            f"worker to resume from epoch {done + 1}"
        ) from None
    except KeyboardInterrupt:
        done = s.backup.saved_epoch
        s.run.record(Status.INTERRUPTED, epochs_done=done)
        # The backup is written at epoch ends only, so the epoch in progress is lost.
        raise Interrupted(
            f"interrupted: {s.run.path} is backed up after epoch {done} of "
            f"{s.cfg.train.epochs}. Run the same command again to resume from epoch {done + 1}"
        ) from None
    s.seconds = time.monotonic() - began


def finish(session: Session) -> TrainResult:
    """Records how training ended in run.json and returns the result.

    Every epoch done: the run is finished and its backup deleted. The time budget spent: the
    run is stopped, its backup kept, and the same command continues it. A non-finite loss:
    the run failed, and TrainingStopped says how to resume from the last finite epoch.

    Args:
        session: after ``fit_run``.

    Returns:
        A TrainResult.
    """
    s, t = session, session.cfg.train
    done = s.backup.saved_epoch  # whole epochs only: an epoch cut short is trained again
    best, _ = s.run.history_best()
    facts = dict(epochs_done=done, best_val_loss=best,
                 train_seconds_last_session=round(s.seconds, 1))  # fmt: skip
    stopped = ""
    if done >= t.epochs:
        s.run.record(Status.FINISHED, **facts)
        s.backup.discard()  # only now: a kill before the line above resumes with nothing to do
    elif s.budget.expired:
        s.run.record(Status.STOPPED, **facts)
        stopped = (
            f"stopped after train.max_minutes={t.max_minutes}: time budget spent after epoch "
            f"{done} of {t.epochs}; run the same command again to continue from epoch {done + 1}"
        )
    else:
        s.run.record(Status.FAILED, **facts)
        raise TrainingStopped(
            f"training stopped: the loss became NaN. Lower train.learning_rate or "
            f"train.grad_clip and run again to resume from epoch {done + 1}, "
            f"the last finite one; {s.run.path} keeps its checkpoints"
        )
    sample = ""
    wrote_weights = s.run.best.exists() or periodic_checkpoints(s.run.path)
    if t.sample_chars and s.topology.is_chief and wrote_weights:
        sample = _final_sampler(s).sample(
            "", t.sample_chars, temperature=SAMPLE_TEMPERATURE, seed=t.seed
        )
    return TrainResult(
        run_dir=s.home or s.run.path,
        best_val_loss=best,
        best_val_bpc=None if best is None else best / math.log(2),
        epochs_done=done,
        sample=sample,
        stopped_early=stopped,
    )


def _final_sampler(s: Session) -> Sampler:
    """The per-epoch sample's Sampler with the checkpoint ``charrnn sample`` would load.

    Reused rather than built again from the run directory: a second model and a second trace
    of its draw cost more than the sample itself.
    """
    if s.sampler is None:
        return Sampler.from_run_dir(s.run.path)
    load_weights(s.sampler.model, find_checkpoint(s.run.path), s.sampler.vocab)
    return s.sampler
