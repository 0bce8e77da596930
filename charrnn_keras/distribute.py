"""Training on several devices or machines with ``tf.distribute`` (``train.distribute``).

``none`` is one device. ``mirrored`` is ``tf.distribute.MirroredStrategy`` over the local GPUs,
or over ``train.replicas`` logical devices cut from the CPU where there is no GPU (so the path
runs, and is tested, on any machine). ``multi_worker`` is
``tf.distribute.MultiWorkerMirroredStrategy`` over the cluster in ``TF_CONFIG``.

``data.batch_size`` is the global number of streams; replica k owns rows ``[k * b, (k + 1) * b)``
of every batch (``b = batch_size / replicas``) for the whole run (``distributed_dataset``). What
each replica keeps for itself (its recurrent state) is in ``replicas.py``. Workers check that
they run the same thing before any step (``agree``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass

import tensorflow as tf

from charrnn_keras.config import DISTRIBUTE, Config
from charrnn_keras.errors import ConfigError, DistributeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topology:
    """Where training runs.

    Args:
        strategy: the ``tf.distribute`` strategy, or None for one device.
        replicas: replicas in sync (devices over all workers).
        workers: machines (processes) taking part.
        worker: this process's index among them.
        is_chief: whether this process owns the run directory.
        devices: this worker's devices.
    """

    strategy: object
    replicas: int
    workers: int
    worker: int
    is_chief: bool
    devices: tuple

    def scope(self):
        """The strategy's scope (a no-op context for one device)."""
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()

    def describe(self) -> str:
        """One line for the user: the strategy and how many replicas and workers."""
        if self.strategy is None:
            return "tf.distribute: none (one device)"
        name = ("MultiWorkerMirroredStrategy"
                if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
                else type(self.strategy).__name__)  # fmt: skip
        line = f"tf.distribute: {name}, {self.replicas} replicas"
        if self.workers > 1:
            line += f" on {self.workers} workers (this is worker {self.worker}"
            line += ", the chief)" if self.is_chief else ")"
        else:
            line += f" ({', '.join(self.devices)})"
        return line


SINGLE = Topology(None, 1, 1, 0, True, ())


def make_topology(cfg: Config) -> Topology:
    """Creates the strategy ``train.distribute`` names. Call before TensorFlow runs any op.

    Args:
        cfg: the run's settings.

    Returns:
        A Topology.

    Raises:
        ConfigError: a setting that cannot work here (one line).
    """
    t = cfg.train
    if t.distribute not in DISTRIBUTE:  # config.py checks it; this guards direct callers
        raise ConfigError(f"train.distribute must be one of {', '.join(DISTRIBUTE)}")
    if t.distribute == "none":
        return SINGLE
    if t.distribute == "mirrored":
        devices = tuple(_local_devices(t.replicas))
        strategy = _strategy("mirrored", devices)
        topology = Topology(strategy, len(devices), 1, 0, True, devices)
    else:
        cluster = read_tf_config()
        strategy = _strategy("multi_worker", ())
        resolver = strategy.cluster_resolver
        workers = sum(len(v) for k, v in cluster["cluster"].items() if k in ("chief", "worker"))
        worker = resolver.task_id + (1 if "chief" in cluster["cluster"] and
                                     resolver.task_type == "worker" else 0)  # fmt: skip
        topology = Topology(
            strategy,
            strategy.num_replicas_in_sync,
            workers,
            worker,
            bool(strategy.extended.should_checkpoint),
            tuple(strategy.extended.worker_devices),
        )
    b = cfg.data.batch_size
    if b % topology.replicas:
        raise ConfigError(
            f"data.batch_size = {b} streams do not split evenly over {topology.replicas} "
            f"replicas; use a multiple of {topology.replicas}"
        )
    return topology


@functools.cache
def _strategy(kind: str, devices: tuple):
    """One strategy per setting and process: a second one over the same devices would reuse
    the first one's collective keys (TensorFlow refuses it, with a shape mismatch)."""
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy(list(devices))
    return tf.distribute.MultiWorkerMirroredStrategy()


def _local_devices(replicas: int) -> list[str]:
    """The devices ``mirrored`` runs on: the GPUs, or the CPU cut into ``replicas`` devices."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        n = replicas or len(gpus)
        if n > len(gpus):
            raise ConfigError(
                f"train.replicas = {n} but this machine has {len(gpus)} GPUs; "
                f"use train.replicas = {len(gpus)} or less (0 = all of them)"
            )
        return [f"/gpu:{i}" for i in range(n)]
    n = replicas or 1
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * n
    if n > 1:
        try:
            tf.config.set_logical_device_configuration(cpu, wanted)
        except RuntimeError:  # TensorFlow started already (a notebook, a test)
            have = len(tf.config.list_logical_devices("CPU"))
            if have != n:
                raise ConfigError(
                    f"train.replicas = {n} needs the CPU split into {n} devices before "
                    f"TensorFlow starts, and this process already has {have}; run it in a "
                    f"new process"
                ) from None
    return [f"/cpu:{i}" for i in range(n)]


def read_tf_config() -> dict:
    """Reads and checks the ``TF_CONFIG`` environment variable (``multi_worker``).

    Returns:
        The parsed TF_CONFIG.

    Raises:
        ConfigError: it is missing or malformed (one line saying what it must hold).
    """
    example = ('TF_CONFIG=\'{"cluster": {"worker": ["host0:port", "host1:port"]}, '
               '"task": {"type": "worker", "index": 0}}\'')  # fmt: skip
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        raise ConfigError(
            f"train.distribute = multi_worker needs the cluster in TF_CONFIG on every worker, "
            f"e.g. {example}"
        )
    try:
        tf_config = json.loads(text)
        workers = tf_config["cluster"].get("worker", []) + tf_config["cluster"].get("chief", [])
        task = tf_config["task"]
        kind, index = task["type"], task["index"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"TF_CONFIG is not valid: it must look like {example}") from None
    if kind not in ("worker", "chief") or not workers:
        raise ConfigError(
            f"TF_CONFIG: task type {kind!r} cannot train here (worker or chief), or the cluster "
            f"lists no workers; it must look like {example}"
        )
    if not isinstance(index, int) or not 0 <= index < len(tf_config["cluster"].get(kind, [])):
        raise ConfigError(
            f"TF_CONFIG: task index {index!r} is not in the cluster's {kind} list "
            f"({len(tf_config['cluster'].get(kind, []))} entries)"
        )
    return tf_config


def distributed_dataset(topology: Topology, ids, batch_size: int, seq_length: int):
    """Returns the per-replica datasets of one split: each replica its own stream rows.

    Args:
        topology: from ``make_topology`` (with a strategy).
        ids: one split of the encoded text.
        batch_size: the global batch (all replicas' rows).
        seq_length: characters per row per batch.

    Returns:
        ``(distributed dataset, steps per epoch)``.
    """
    from charrnn_keras import data as data_lib

    steps = data_lib.num_batches(len(ids), batch_size, seq_length)

    def per_worker(context: tf.distribute.InputContext):
        local = context.num_replicas_in_sync // context.num_input_pipelines
        first = context.input_pipeline_id * local
        ds, _ = data_lib.make_dataset(
            ids, batch_size, seq_length, replicas=context.num_replicas_in_sync,
            local=range(first, first + local),
        )  # fmt: skip
        # Repeated, because Keras keeps one iterator over epochs when given steps_per_epoch;
        # every epoch is exactly ``steps`` elements, so each starts at the text's beginning.
        return ds.repeat()

    return topology.strategy.distribute_datasets_from_function(per_worker), steps


def fingerprint(value) -> int:
    """A 31-bit hash of a JSON-able value (what ``agree`` compares across workers)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 1


def agree(topology: Topology, facts: dict, failed: bool = False) -> None:
    """Checks that every worker holds the same ``facts``; a collective, so all must call it.

    Every worker also learns whether another one failed its own checks (``failed``), so that
    nobody waits for a worker that has already stopped.

    Args:
        topology: from ``make_topology``.
        facts: name -> JSON-able value (config keys, the corpus' sha256, the resumed epoch).
        failed: this worker is about to stop with its own error.

    Raises:
        DistributeError: another worker failed, or the workers disagree (one line naming what).
    """
    if topology.workers == 1:
        return
    names = sorted(facts)
    mine = [int(failed)] + [fingerprint(facts[n]) for n in names]
    strategy = topology.strategy

    try:
        values = strategy.run(lambda: tf.constant([mine], tf.int64))
        table = strategy.gather(values, axis=0).numpy()  # a row per replica
    except tf.errors.OpError as e:  # a worker that is gone: Unavailable, Cancelled, ...
        if failed:
            return  # this worker's own error says why
        raise DistributeError(
            f"worker {topology.worker} could not reach the other workers "
            f"({type(e).__name__}); start the same command on every worker in TF_CONFIG"
        ) from None
    if failed:
        return  # this worker's own error says why
    if table[:, 0].any():
        raise DistributeError(
            f"worker {topology.worker}: another worker stopped before training (its output "
            f"says why); fix it and run the same command on every worker"
        )
    differ = [n for i, n in enumerate(names, 1) if (table[:, i] != table[0, i]).any()]
    if differ:
        shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise DistributeError(
            f"the workers disagree on {shown}: every worker must run the same command with the "
            f"same config and corpus (this is worker {topology.worker}: "
            + "; ".join(f"{n} = {facts[n]!r}" for n in differ[:3])
            + ")"
        )


def config_facts(cfg: Config) -> dict:
    """The config as ``agree`` facts, one per dotted key."""
    return {f"{section}.{key}": value
            for section, values in cfg.to_dict().items()
            for key, value in values.items()}  # fmt: skip
