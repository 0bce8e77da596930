"""What each replica keeps for itself under a ``tf.distribute`` strategy, and what they share.

A stateful stream must meet its own state at every step, and Keras keeps an RNN's state in one
variable that a strategy would mirror. So the state variables are created replica-local
(``tf.VariableSynchronization.ON_READ``, ``replica_local_states``): each replica reads and
writes its own copy, a reset zeroes them all, and no state is ever averaged or broadcast.
Gradients are clipped by the norm of the global gradient, after the all-reduce
(``GlobalClipAdam``), as on one device; Keras' own ``global_clipnorm`` clips each replica's
share before summing, which is another computation.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from charrnn_keras.distribute import Topology

STATE_NAME = "rnn_state"  # the name Keras gives a stateful RNN's state variables


def replica_local_states(next_creator, **kwargs):
    """A ``tf.variable_creator_scope`` creator: RNN state variables become replica-local.

    Each replica then reads and writes its own copy in its steps; read from outside a step the
    first replica's is returned, and an assignment from outside (a reset) reaches every copy.
    """
    if (kwargs.get("name") or "").split("/")[-1].split(":")[0] == STATE_NAME:
        kwargs["synchronization"] = tf.VariableSynchronization.ON_READ
        kwargs["aggregation"] = tf.VariableAggregation.ONLY_FIRST_REPLICA
    return next_creator(**kwargs)


@contextlib.contextmanager
def building(topology: Topology):
    """The context to build and compile the training model in."""
    with topology.scope(), tf.variable_creator_scope(replica_local_states):
        yield


def use_scope_strategy(model: keras.Model, topology: Topology) -> None:
    """Makes ``model.fit`` take its strategy from the scope it runs in (``fit_run``'s).

    Keras 3 gives a model built under a strategy a "symbolic build" step in ``fit`` that
    reduces a batch ``(x, y)`` across replicas, which ``MultiWorkerMirroredStrategy`` cannot do
    for a tuple (tensorflow/tensorflow#72388). A model that did not record its strategy skips
    that step and builds when its train function is traced, as on one device, and Keras'
    ``distribute_strategy`` property then returns ``tf.distribute.get_strategy()``: the scope's.
    There is no public setter, hence the attribute.
    """
    if topology.strategy is not None:
        model._distribute_strategy = None


def multi_worker_logs(logs: dict) -> dict:
    """Gives a step's scalar logs the leading axis Keras' multi-worker reduction expects.

    Under ``MultiWorkerMirroredStrategy`` Keras reduces a step's logs with
    ``strategy.reduce("MEAN", v, axis=0)``, which fails on scalars (the same Keras issue); the
    values are already synchronized across replicas, so a ``[1]`` copy reduces to themselves.
    Elsewhere ``logs`` is returned as it is.
    """
    if not isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return logs
    return {k: tf.reshape(v, [1]) if tf.is_tensor(v) and v.shape.rank == 0 else v
            for k, v in logs.items()}  # fmt: skip


def replica_states(topology: Topology, variable) -> list:
    """Every replica's copy of a state variable on this worker, as numpy arrays."""
    if topology.strategy is None:
        return [variable.numpy()]
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return [v.numpy() for v in topology.strategy.experimental_local_results(value)]


def set_replica_states(topology: Topology, variable, values) -> None:
    """Puts back what ``replica_states`` read."""
    if topology.strategy is None:
        variable.assign(values[0])
        return
    value = variable.value if isinstance(variable, keras.Variable) else variable
    for v, x in zip(topology.strategy.experimental_local_results(value), values, strict=True):
        v.assign(x)


class GlobalClipAdam(keras.optimizers.Adam):
    """Adam that clips by the global norm of the whole gradient under any strategy.

    Keras sums the replicas' gradients after its clipping step, so ``global_clipnorm`` clips
    each replica's share by that share's norm. Here every replica learns the norm of the sum
    (one extra all-reduce) and scales its share by ``clip / max(norm, clip)``; the sum Keras
    then takes is the clipped global gradient, as on one device.

    Args:
        clipnorm_global: the global norm to clip to (0 = no clipping).
        **kwargs: as for ``keras.optimizers.Adam`` (without clipping arguments).
    """

    def __init__(self, clipnorm_global: float = 0.0, **kwargs):
        if not clipnorm_global >= 0:
            raise ValueError(
                f"clipnorm_global must be 0 or more, received: clipnorm_global={clipnorm_global}"
            )
        super().__init__(**kwargs)
        self.clipnorm_global = clipnorm_global

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if self.clipnorm_global:
            context = tf.distribute.get_replica_context()
            total = grads
            if context is not None and context.num_replicas_in_sync > 1:
                total = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            norm = tf.linalg.global_norm(total)
            scale = self.clipnorm_global / tf.maximum(norm, self.clipnorm_global)
            grads = [g * tf.cast(scale, g.dtype) for g in grads]
        return super().apply(grads, trainable_variables)

    def get_config(self):
        return {**super().get_config(), "clipnorm_global": self.clipnorm_global}
