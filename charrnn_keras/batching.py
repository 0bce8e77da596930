"""Request batching in TF Serving's terms: ``batching_parameters.txt`` and the in-graph op.

Two ways to merge concurrent ``generate`` requests, both TensorFlow's own machinery:

- stock TF Serving with ``--enable_batching --batching_parameters_file=...``: its
  BatchingSession concatenates requests along the first dimension, which ``generate`` allows
  (every input has one value per row; a row's text does not depend on the other rows);
- ``charrnn export --batching_parameters_file FILE``: ``generate`` runs inside TensorFlow's
  ``BatchFunction`` op, so concurrent ``Session.run`` calls are merged by the graph itself, in
  ``charrnn serve`` and in TF Serving without any server flag.

Both read TF Serving's ``BatchingParameters`` text proto. The pip package
``tensorflow-serving-api`` does not ship ``session_bundle_config_pb2``, so the message is built
here from the fields of ``tensorflow_serving/servables/tensorflow/session_bundle_config.proto``
(same names, numbers and wrapper types), and read and written with protobuf's ``text_format``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from charrnn_keras import atomic
from charrnn_keras.errors import ServingError

log = logging.getLogger(__name__)

BATCHING_PARAMETERS = "batching_parameters.txt"
# The shared_name of the BatchFunction resource: generate and serving_default run the same
# function, so their requests join the same batches.
SHARED_NAME = "charrnn_generate_batch"
# (name, number, wrapper type) of BatchingParameters, as in session_bundle_config.proto.
_WRAPPED = [("max_batch_size", 1, "Int64Value"), ("batch_timeout_micros", 2, "Int64Value"),
            ("max_enqueued_batches", 3, "Int64Value"), ("num_batch_threads", 4, "Int64Value"),
            ("thread_pool_name", 5, "StringValue"),
            ("enable_large_batch_splitting", 8, "BoolValue"),
            ("max_execution_batch_size", 9, "Int64Value")]  # fmt: skip

# Defaults for this model on a CPU. One generate row is a sequential loop of small matmuls, so a
# batch of 64 rows costs little more than one row: batches up to 64 (the 64 clients).
# Clients that got their answers from one batch come back spread out (each request passes the
# server's Python and the GIL one at a time), so the batch waits 40 ms for them: 8 clients got
# more requests/s with 20 ms than 2 to 10 ms, and with 40 ms than 20 (one batch thread). One
# batch thread: with two, the next batch can start half full beside the running one, on the
# same cores; with one, requests that arrive meanwhile join the next batch (BENCHMARKS.md,
# section 4). Padding to powers of two keeps the shapes oneDNN sees few, at most doubling the
# (cheap) rows; 64 batches may queue before requests are refused with UNAVAILABLE, as TF
# Serving does. A lone request waits the whole 40 ms: batching is for many clients.
DEFAULTS = {
    "max_batch_size": 64,
    "batch_timeout_micros": 40000,
    "num_batch_threads": 1,
    "max_enqueued_batches": 64,
    "allowed_batch_sizes": [1, 2, 4, 8, 16, 32, 64],
}


@functools.cache
def parameters_class() -> type:
    """Returns TF Serving's ``tensorflow.serving.BatchingParameters`` message class."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    file = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
        package="tensorflow.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )  # fmt: skip
    message = file.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    for name, number, wrapper in _WRAPPED:
        wrapped = f".google.protobuf.{wrapper}"
        message.field.add(name=name, number=number, label=field.LABEL_OPTIONAL,
                          type=field.TYPE_MESSAGE, type_name=wrapped)  # fmt: skip
    message.field.add(name="allowed_batch_sizes", number=6, label=field.LABEL_REPEATED,
                      type=field.TYPE_INT64)  # fmt: skip
    message.field.add(name="pad_variable_length_inputs", number=7, label=field.LABEL_OPTIONAL,
                      type=field.TYPE_BOOL)  # fmt: skip
    # A pool of its own, so the real session_bundle_config_pb2, if ever imported, cannot clash.
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(file.SerializeToString())
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    )


def default_parameters():
    """Returns the BatchingParameters this package recommends (``DEFAULTS``)."""
    params = parameters_class()()
    for name, value in DEFAULTS.items():
        if name == "allowed_batch_sizes":
            params.allowed_batch_sizes.extend(value)
        else:
            getattr(params, name).value = value
    return params


def check(params, source: str = "batching parameters"):
    """Returns ``params`` if the BatchingParameters op can run with them, else raises.

    Args:
        params: a BatchingParameters message.
        source: what to name in the error (e.g. the file).

    Returns:
        The same message.
    """
    sizes = list(params.allowed_batch_sizes)
    most = params.max_batch_size.value
    problems = [
        (most < 1, f"max_batch_size must be at least 1, got {most}"),
        (params.num_batch_threads.value < 1, "num_batch_threads must be at least 1"),
        (params.batch_timeout_micros.value < 0, "batch_timeout_micros must not be negative"),
        (params.max_enqueued_batches.value < 1, "max_enqueued_batches must be at least 1"),
        (sizes != sorted(set(sizes)) or (sizes and (sizes[0] < 1 or sizes[-1] != most)),
         "allowed_batch_sizes must increase and end with max_batch_size"),
    ]  # fmt: skip
    for bad, why in problems:
        if bad:
            raise ServingError(f"{source}: {why}")
    return params


def write_parameters(path, params=None) -> Path:
    """Writes BatchingParameters (default ``default_parameters()``) as TF Serving's text proto.

    Args:
        path: the file, e.g. ``export/batching_parameters.txt``.
        params: the message to write.

    Returns:
        The path written.
    """
    from google.protobuf import text_format

    params = check(default_parameters() if params is None else params)
    header = "".join(f"# {line}\n" for line in _HEADER.splitlines())
    atomic.write_text(Path(path), header + text_format.MessageToString(params))
    return Path(path)


_HEADER = """\
TF Serving BatchingParameters (session_bundle_config.proto), for
  tensorflow_model_server --enable_batching --batching_parameters_file=<this file>
or charrnn export --batching_parameters_file <this file> (batching inside the graph; then
serve without --enable_batching). generate rows are independent, so a batch of up to 64 rows
costs little more than one row: wait up to 40 ms for clients to come back, pad to powers of
two (few shapes), run one batch at a time, queue up to 64 batches before refusing with
UNAVAILABLE."""


def read_parameters(path):
    """Parses a BatchingParameters text proto (TF Serving's ``--batching_parameters_file``).

    Unset fields take TF Serving's defaults where the op needs a value.

    Args:
        path: the file.

    Returns:
        The checked BatchingParameters message.
    """
    from google.protobuf import text_format

    try:
        text = Path(path).read_text(encoding="utf-8")
        params = text_format.Parse(text, parameters_class()())
    except OSError as e:
        raise ServingError(f"cannot read {path}: {e.strerror}") from None
    except (text_format.ParseError, UnicodeDecodeError) as e:
        message = " ".join(str(e).split())
        raise ServingError(f"{path} is not a BatchingParameters text proto: {message}") from None
    # TF Serving's defaults: SharedBatchScheduler's QueueOptions and Options (threads: the
    # machine's parallelism).
    for name, value in [("max_batch_size", 1000), ("batch_timeout_micros", 0),
                        ("max_enqueued_batches", 10),
                        ("num_batch_threads", os.cpu_count() or 1)]:  # fmt: skip
        if not params.HasField(name):
            getattr(params, name).value = value
    return check(params, str(path))


def batched(fn, params, specs):
    """Wraps ``fn`` in TensorFlow's BatchFunction op, as ``tf.nondifferentiable_batch_function``.

    Concurrent Session runs of the returned function are concatenated along the first
    dimension (padded with copies of a row up to an allowed size), run as one call of ``fn``,
    and split back, so each caller gets its own rows. Written with ``tf.raw_ops.BatchFunction``
    rather than the decorator to give the resource a fixed ``shared_name`` and to turn off
    large batch splitting: TF 2.21 returns a split request's rows silently truncated when one
    of its batches fails (e.g. a batch-mate's run was cancelled). A request with more rows
    than ``max_batch_size`` is a batch already; it runs ``fn`` directly instead.

    TensorFlow runs a batch under the Session run of its last request, so that run's
    cancellation or ``timeout_in_ms`` fails every request in the batch; servers must not
    cancel runs of a batched export (``servable.LoadedVersion`` does not).

    Args:
        fn: a function of tensors with the batch first, returning a list of such tensors.
        params: BatchingParameters.
        specs: one ``tf.TensorSpec`` per argument of ``fn``.

    Returns:
        A function with ``fn``'s arguments that returns its outputs as a list.
    """
    import tensorflow as tf

    most = params.max_batch_size.value
    log.info(
        "generate batched in the graph: up to %d rows, %d us wait, %d threads, sizes %s",
        most, params.batch_timeout_micros.value, params.num_batch_threads.value,
        list(params.allowed_batch_sizes) or "any",
    )  # fmt: skip

    def through_batch(*args):
        computation = tf.function(fn, autograph=False).get_concrete_function(*specs)
        return tf.raw_ops.BatchFunction(
            in_tensors=list(args),
            captured_tensors=computation.captured_inputs,
            f=computation,
            num_batch_threads=params.num_batch_threads.value,
            max_batch_size=most,
            batch_timeout_micros=params.batch_timeout_micros.value,
            max_enqueued_batches=params.max_enqueued_batches.value,
            allowed_batch_sizes=list(params.allowed_batch_sizes),
            shared_name=SHARED_NAME,
            enable_large_batch_splitting=False,
            Tout=[o.dtype for o in computation.outputs],
        )

    def run(*args):
        rows = tf.shape(args[0])[0]
        return tf.cond(rows <= most, lambda: through_batch(*args), lambda: fn(*args))

    return run
