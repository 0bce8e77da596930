"""Request and response tensors, converted and checked the way TF Serving does it.

``input_array`` turns a request's TensorProto into an array after checking it against the
signature (dtype, shape, size) with TF Serving's INVALID_ARGUMENT messages;
``typed_tensor_proto`` writes responses in the typed fields TF Serving uses; ``clean_message``
keeps the part of a TensorFlow error a client can act on; ``CODES`` maps TensorFlow's error codes
to gRPC's.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import tensorflow as tf

from charrnn_keras.serving.lanes import RequestError

CODES = {code.value[0]: code for code in grpc.StatusCode}  # TF error codes are gRPC's
_TYPED = {np.dtype(t): field for t, field in [
    (np.float32, "float_val"), (np.float64, "double_val"), (np.int32, "int_val"),
    (np.int16, "int_val"), (np.int8, "int_val"), (np.uint8, "int_val"), (np.int64, "int64_val"),
    (np.bool_, "bool_val")]}  # fmt: skip
# The most elements one request input may declare. A TensorProto may declare a larger shape than
# the values it carries (the last value fills the rest, as in TF's Tensor::FromProto), so without
# a cap a few bytes could make the server allocate gigabytes. gRPC's default 4 MiB request limit
# carries at most this many elements written out (1 byte each), so no honest request is refused.
MAX_INPUT_ELEMENTS = 4 * 1024 * 1024


def typed_tensor_proto(value):
    """Returns a TensorProto with values in typed fields (float_val, string_val, ...).

    Args:
        value: a numpy array or scalar, as ``Session.run`` returns it.

    Returns:
        The TensorProto, filled the way TF Serving fills responses (not ``tensor_content``).
    """
    array = np.asarray(value)
    field = _TYPED.get(array.dtype)
    if field is None:  # strings are typed already; anything rarer keeps make_tensor_proto's form
        return tf.make_tensor_proto(array)
    proto = tf.make_tensor_proto(np.zeros([0], array.dtype))
    proto.ClearField("tensor_content")
    proto.tensor_shape.Clear()
    proto.tensor_shape.dim.extend(proto.tensor_shape.Dim(size=n) for n in array.shape)
    getattr(proto, field).extend(array.ravel().tolist())
    return proto


def clean_message(message: str) -> str:
    """Keeps the lines of a TensorFlow error a client can act on (no graph node names), and
    turns a graph assert's ``assertion failed: [message] [value]`` into ``message value``."""
    skip = ("Graph execution error", "[[", "Detected at node")
    lines = [line.strip() for line in message.splitlines()]
    text = " ".join(line for line in lines if line and not line.startswith(skip)) or message
    if text.startswith(_ASSERTION):
        said, _, values = text.removeprefix(_ASSERTION).partition("] ")
        text = f"{said.removeprefix('[')} {values.removeprefix('[').removesuffix(']')}".strip()
    return text


_ASSERTION = "assertion failed: "  # how tf.debugging.Assert's InvalidArgumentError begins


def input_array(alias: str, proto, info) -> np.ndarray:
    """Converts one request input, checking dtype and shape against the signature.

    The declared shape is checked before any value is converted, so that a TensorProto declaring
    a huge shape is refused without allocating it.
    """
    if proto.dtype != info.dtype:
        try:
            got = tf.as_dtype(proto.dtype).name if proto.dtype else "no dtype"
        except TypeError:  # an enum value TensorFlow does not know
            got = f"unknown dtype {proto.dtype}"
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Expects input {alias!r} to be {tf.as_dtype(info.dtype).name} but {got} is provided",
        )
    dims = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_shape.unknown_rank or any(d < 0 for d in dims):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input {alias!r} must have a fully defined shape, got "
            f"{'unknown rank' if proto.tensor_shape.unknown_rank else dims}",
        )
    shape = tf.TensorShape(info.tensor_shape)
    if not shape.is_compatible_with(dims):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input {alias!r} has shape {dims}; the signature wants {shape}",
        )
    if math.prod(dims) > MAX_INPUT_ELEMENTS:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input {alias!r} declares shape {dims}: more than {MAX_INPUT_ELEMENTS} elements",
        )
    try:
        return tf.make_ndarray(proto)
    except Exception as e:  # a malformed TensorProto; protobuf and numpy raise many kinds
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input {alias!r}: {e}") from None
