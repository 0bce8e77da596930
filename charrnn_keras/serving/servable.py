"""One served model: its versions loaded into graph-mode Sessions, and requests run on them.

Each version runs in its own ``tf.compat.v1.Session`` loaded with the ``serve`` tag, the
graph-mode path of TF Serving's C++ loader, so a model that works here loads there. Requests
are checked the way TF Serving checks them and refused with the same gRPC status codes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2

from charrnn_keras.errors import ServingError
from charrnn_keras.serving import names

log = logging.getLogger(__name__)


_CODES = {code.value[0]: code for code in grpc.StatusCode}  # TF error codes are gRPC's
_TYPED = {np.dtype(t): field for t, field in [
    (np.float32, "float_val"), (np.float64, "double_val"), (np.int32, "int_val"),
    (np.int16, "int_val"), (np.int8, "int_val"), (np.uint8, "int_val"), (np.int64, "int64_val"),
    (np.bool_, "bool_val")]}  # fmt: skip
_STATE = get_model_status_pb2.ModelVersionStatus
# The most elements one request input may declare. A TensorProto may declare a larger shape than
# the values it carries (the last value fills the rest, as in TF's Tensor::FromProto), so without
# a cap a few bytes could make the server allocate gigabytes. gRPC's default 4 MiB request limit
# carries at most this many elements written out (1 byte each), so no honest request is refused.
MAX_INPUT_ELEMENTS = 4 * 1024 * 1024
# gRPC reports "no deadline" as about 9e18 seconds left; run those without a Session timeout.
_NO_DEADLINE_S = 365 * 24 * 3600.0


class RequestError(Exception):
    """A request the server refuses, with the gRPC status code to answer."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


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


class LoadedVersion:
    """One version of the model in its own graph and Session; retired when replaced.

    Args:
        path: the version directory (a SavedModel).
        version: its version number.
    """

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version
        self.session = tf.compat.v1.Session(graph=tf.Graph())
        try:
            with self.session.graph.as_default():
                loader = tf.compat.v1.saved_model.loader
                meta = loader.load(self.session, [names.SERVE_TAG], str(path))
        except Exception:
            self.session.close()
            raise
        self.signatures = dict(meta.signature_def)
        self._lock = threading.Lock()
        self._users, self._retired = 0, False

    @contextlib.contextmanager
    def use(self):
        """Marks the version in use, so that retiring it waits for running requests."""
        with self._lock:
            self._users += 1
        try:
            yield self
        finally:
            with self._lock:
                self._users -= 1
                close = self._retired and self._users == 0
            if close:
                self.session.close()

    def retire(self) -> None:
        """Closes the Session now, or when its last running request ends."""
        with self._lock:
            self._retired = True
            close = self._users == 0
        if close:
            self.session.close()

    def predict(self, request, timeout: float | None = None) -> dict:
        """Runs a PredictRequest; returns {output alias: numpy value}; raises RequestError.

        Args:
            request: the PredictRequest.
            timeout: seconds left before the client's deadline; None, or more than a year,
                is no deadline. The Session run is cancelled when it passes (TF Serving's
                ``enforce_session_run_timeout``), so an abandoned long generation stops using
                a worker and the CPU.
        """
        name = request.model_spec.signature_name or names.SERVING_DEFAULT
        signature = self.signatures.get(name)
        if signature is None or signature.method_name != names.PREDICT_METHOD:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.'
            )
        sent, wanted = set(request.inputs), set(signature.inputs)
        if sent != wanted:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature: {len(sent)}!={len(wanted)}. "
                f"Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
                f"Missing but required: {{{','.join(sorted(wanted - sent))}}}.",
            )
        feed = {info.name: _input_array(alias, request.inputs[alias], info)
                for alias, info in signature.inputs.items()}  # fmt: skip
        aliases = list(request.output_filter) or sorted(signature.outputs)
        for alias in aliases:
            if alias not in signature.outputs:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} Outputs expected to "
                    f"be in the set {{{','.join(sorted(signature.outputs))}}}.",
                )
        if len(set(aliases)) != len(aliases):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "duplicate output tensor alias")
        options = None
        if timeout is not None and timeout < _NO_DEADLINE_S:
            options = tf.compat.v1.RunOptions(timeout_in_ms=max(1, math.ceil(timeout * 1000)))
        try:
            fetches = {a: signature.outputs[a].name for a in aliases}
            return self.session.run(fetches, feed, options=options)
        except tf.errors.OpError as e:
            code = _CODES.get(e.error_code, grpc.StatusCode.UNKNOWN)
            raise RequestError(code, _clean_message(e.message)) from None

    def warm_up(self) -> None:
        """Runs every predict signature once on placeholder inputs (as TF Serving's warmup).

        The first run of a Session prunes and optimises the graph, which takes far longer than
        a request; doing it here keeps that off the first client's reply.
        """
        for name, signature in self.signatures.items():
            if signature.method_name != names.PREDICT_METHOD:
                continue
            feed = {}
            for info in signature.inputs.values():
                shape = [max(d.size, 1) for d in info.tensor_shape.dim]
                dtype = tf.as_dtype(info.dtype)
                if dtype == tf.string:
                    feed[info.name] = np.full(shape, b"", dtype=object)
                else:
                    feed[info.name] = np.zeros(shape, dtype.as_numpy_dtype)
            try:
                self.session.run({k: v.name for k, v in signature.outputs.items()}, feed)
            except tf.errors.OpError as e:  # a signature that needs real inputs; not fatal
                log.debug("warm-up of %s skipped: %s", name, _clean_message(e.message))


def _clean_message(message: str) -> str:
    """Keeps the lines of a TensorFlow error a client can act on (no graph node names)."""
    skip = ("Graph execution error", "[[", "Detected at node")
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith(skip)]
    return " ".join(kept) or message


def _input_array(alias: str, proto, info) -> np.ndarray:
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


class ModelManager:
    """Serves the highest version of one model and swaps in newer ones as they appear.

    Args:
        export_dir: TF Serving's base directory.
        model_name: the model's folder name under ``export_dir``.
    """

    def __init__(self, export_dir, model_name: str):
        self.model_name = names.check_model_name(model_name)
        self.model_dir = Path(export_dir) / model_name
        if not Path(export_dir).is_dir():
            raise ServingError(f"export directory {export_dir} does not exist; run charrnn export")
        if not names.list_versions(self.model_dir):
            raise ServingError(
                f"{self.model_dir} holds no exported version; export one there first "
                f"(charrnn export)"
            )
        self._lock, self._refresh_lock = threading.Lock(), threading.Lock()
        self._current: LoadedVersion | None = None
        self._states: dict[int, int] = {}  # version -> ModelVersionStatus.State
        self.refresh()

    def refresh(self) -> None:
        """Loads the highest version if it is not the one served (TF Serving's default policy)."""
        with self._refresh_lock:
            versions = [v for v in names.list_versions(self.model_dir)
                        if self._states.get(v) != _STATE.END]  # fmt: skip
            current = self._current
            if not versions or (current is not None and current.version == versions[-1]):
                return
            version = versions[-1]
            self._states[version] = _STATE.LOADING
            try:
                loaded = LoadedVersion(self.model_dir / str(version), version)
                loaded.warm_up()
            except Exception:  # a broken version must not stop the one already served
                log.exception("cannot load %s version %d", self.model_name, version)
                self._states[version] = _STATE.END
                return
            with self._lock:
                old, self._current = self._current, loaded
                self._states[version] = _STATE.AVAILABLE
                if old is not None:
                    self._states[old.version] = _STATE.END
            if old is not None:
                old.retire()
            log.info("serving %s version %d from %s", self.model_name, version, loaded.path)

    @contextlib.contextmanager
    def acquire(self, model_spec):
        """Yields the LoadedVersion a ModelSpec asks for; raises RequestError if none."""
        if model_spec.version_label:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Unrecognized servable version label: {model_spec.version_label}",
            )
        with self._lock:
            current = self._current
            specific = model_spec.HasField("version")
            if (
                model_spec.name != self.model_name
                or current is None
                or (specific and model_spec.version.value != current.version)
            ):
                what = f"Specific({model_spec.name}, {model_spec.version.value})" if specific \
                    else f"Latest({model_spec.name})"  # fmt: skip
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {what}"
                )
            use = current.use()
            use.__enter__()  # under the lock, so the version cannot be closed in between
        try:
            yield current
        finally:
            use.__exit__(None, None, None)

    def status(self, model_spec) -> list:
        """Returns ModelVersionStatus messages, as ModelService.GetModelStatus answers."""
        with self._lock:
            states = dict(self._states) if model_spec.name == self.model_name else {}
        if not states:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {model_spec.name}"
            )
        if model_spec.HasField("version"):
            v = model_spec.version.value
            if v not in states:
                raise RequestError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {v} of model {model_spec.name}",
                )
            states = {v: states[v]}
        return [_STATE(version=v, state=s) for v, s in sorted(states.items())]

    def close(self) -> None:
        with self._lock:
            current, self._current = self._current, None
        if current is not None:
            current.retire()
