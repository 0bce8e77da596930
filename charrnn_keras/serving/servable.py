"""One version of a served model loaded into graph-mode Sessions, and requests run on them.

Each version runs in its own ``tf.compat.v1.Session`` loaded with the ``serve`` tag, the
graph-mode path of TF Serving's C++ loader, so a model that works here loads there; long
generations run in Sessions of their own (``lanes``). Requests are checked the way TF Serving
checks them and refused with the same gRPC status codes. ``versions.ModelManager`` decides
which version is served.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from charrnn_keras.serving import names, tensors
from charrnn_keras.serving.lanes import HEAVY_COST, Call, HeavyLane, Outcomes, RequestError

log = logging.getLogger(__name__)


# gRPC reports "no deadline" as about 9e18 seconds left; run those without a Session timeout.
_NO_DEADLINE_S = 365 * 24 * 3600.0
# The warm-up runs with a deadline, as clients' requests do (a Session run with RunOptions).
_WARMUP_DEADLINE_S = 300.0
# Threads within one op (TF Serving's --tensorflow_intra_op_parallelism). One: a generate step
# is a few [rows, units] x [units, 4 units] matmuls, too small to gain from a second thread but
# not from the wake-up it costs, and concurrent requests (or batches) already fill the cores
# through the inter-op pool. On the 2-core VM one thread gave 1.7x the requests/s of the default
# at 8 clients without batching and 1.3x with it, the same text (BENCHMARKS.md, section 4).
INTRA_OP_THREADS = 1


class LoadedVersion:
    """One version of the model in its own graph and Sessions; retired when replaced.

    Short requests run in the main Session; long ``generate`` requests (rows x characters
    above ``heavy_cost``) in the heavy lane's Sessions (``lanes.HeavyLane``), so that they can
    neither starve the short ones nor keep running once their client has gone.

    Args:
        path: the version directory (a SavedModel).
        version: its version number.
        heavy_slots: long generations run at once (0: no lane, all in the main Session).
        heavy_queue: long generations that may wait for a slot; more are refused.
        heavy_cost: rows x (characters + prime bytes) above which a generation is long.
        outcomes: where each request's outcome is counted (default: a new Outcomes).
        intra_op_threads: threads within one op (0: TensorFlow's choice, one per core).
        inter_op_threads: threads running ops side by side (0: TensorFlow's choice).
    """

    def __init__(self, path: Path, version: int, heavy_slots: int = 1, heavy_queue: int = 8,
                 heavy_cost: int = HEAVY_COST, outcomes: Outcomes | None = None,
                 intra_op_threads: int = INTRA_OP_THREADS, inter_op_threads: int = 0):  # fmt: skip
        self.path, self.version, self.heavy_cost = path, version, heavy_cost
        self.outcomes = outcomes or Outcomes()
        self._threads = (intra_op_threads, inter_op_threads)
        self.session, meta = _load(path, session_config(*self._threads))
        self.signatures = dict(meta.signature_def)
        self._lock = threading.Lock()
        self._users, self._retired = 0, False
        self.lane, self.max_chars = None, _max_chars(self.session, self.signatures)
        generate = self.signatures.get(names.GENERATE)
        # Batched in the graph (charrnn export --batching_parameters_file): TensorFlow runs a
        # batch under one of its requests' Session runs, so cancelling that run would fail its
        # batch-mates; such runs get no timeout, and an expired client just stops waiting.
        self.batched = generate is not None and names.BATCH_SIZE in generate.outputs
        if heavy_slots > 0 and generate is not None and names.NUM_CHARS in generate.inputs:
            try:
                self.lane = HeavyLane(self._lane_session, heavy_slots, heavy_queue, self.outcomes)
            except Exception:
                self.session.close()
                raise

    def _lane_session(self):
        """A Session for the heavy lane: a one-thread inter-op pool of its own, warmed up."""
        config = session_config(self._threads[0], 0)
        config.session_inter_op_thread_pool.add(num_threads=1)
        session, _ = _load(self.path, config)
        _warm_up(session, {names.GENERATE: self.signatures[names.GENERATE]}, self.path)
        return session

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
                self._close()

    @property
    def in_use(self) -> int:
        """Requests using this version now (running, or waiting for the heavy lane)."""
        with self._lock:
            return self._users

    def retire(self) -> None:
        """Closes the Sessions now, or when the last running request ends."""
        with self._lock:
            self._retired = True
            close = self._users == 0
        if close:
            self._close()

    def _close(self) -> None:
        self.session.close()
        if self.lane is not None:
            self.lane.close()

    def predict(self, request, timeout: float | None = None, call: Call | None = None) -> dict:
        """Runs a PredictRequest; returns {output alias: numpy value}; raises RequestError.

        Args:
            request: the PredictRequest.
            timeout: seconds left before the client's deadline; None, or more than a year,
                is no deadline. The Session run is cancelled when it passes (TF Serving's
                ``enforce_session_run_timeout``), so an abandoned long generation stops using
                a worker and the CPU.
            call: the client's Call: a request whose client has left is not started, and a
                long generation running in the heavy lane is stopped when its client leaves.

        Returns:
            {output alias: numpy value}.
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
        arrays = {alias: tensors.input_array(alias, request.inputs[alias], info)
                  for alias, info in signature.inputs.items()}  # fmt: skip
        feed = {signature.inputs[alias].name: array for alias, array in arrays.items()}
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
        options, deadline = None, None
        if timeout is not None and timeout < _NO_DEADLINE_S:
            if self.batched and timeout <= 0:  # expired while it waited: not worth a batch row
                self.outcomes.add("deadline")
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            options = tf.compat.v1.RunOptions(timeout_in_ms=max(1, math.ceil(timeout * 1000)))
            deadline = time.monotonic() + timeout
        call = call or Call()
        fetches = {a: signature.outputs[a].name for a in aliases}
        try:
            if self.lane is not None and self._is_heavy(arrays):
                out = self.lane.run(fetches, feed, call, options, deadline)
            elif call.cancelled:  # its client left while it waited for a worker thread
                self.outcomes.add("dropped")
                raise RequestError(
                    grpc.StatusCode.CANCELLED, "the client left before the request started"
                )
            else:
                # A lane Session runs one request at a time, so its timeout fails no one else.
                out = self.session.run(fetches, feed, options=None if self.batched else options)
        except tf.errors.OpError as e:
            code = tensors.CODES.get(e.error_code, grpc.StatusCode.UNKNOWN)
            self.outcomes.add("deadline" if code == grpc.StatusCode.DEADLINE_EXCEEDED else "failed")
            raise RequestError(code, tensors.clean_message(e.message)) from None
        self.outcomes.add("completed")
        return out

    def _is_heavy(self, arrays: dict) -> bool:
        if _cost(arrays) <= self.heavy_cost:
            return False
        # A num_chars the model refuses is refused at once, not after waiting for the lane.
        num_chars = np.asarray(arrays[names.NUM_CHARS]).ravel()
        return self.max_chars is None or bool(
            np.all((num_chars >= 0) & (num_chars <= self.max_chars))
        )

    def warm_up(self) -> None:
        """Replays the SavedModel's warm-up requests, as TF Serving does before it reports a
        version AVAILABLE (``assets.extra/tf_serving_warmup_requests``, PredictionLog records).

        The first run of a Session prunes and optimises the graph, which takes far longer than
        a request; doing it here keeps that off the first client's reply. The records go
        through ``predict`` with a deadline and their outputs through
        ``tensors.typed_tensor_proto``, as a client's request does, so the first request runs
        no code path, feed conversion or run option that the warm-up did not; they are not
        counted as outcomes. A SavedModel without the file gets one run of each predict
        signature on placeholder inputs.
        """
        records = _warmup_records(self.path)
        if records is None:
            _warm_up(self.session, self.signatures)
            return
        counted, self.outcomes = self.outcomes, Outcomes()  # not yet served: no one else counts
        try:
            for request in records:
                if (request.model_spec.signature_name or names.SERVING_DEFAULT) in self.signatures:
                    for value in self.predict(request, timeout=_WARMUP_DEADLINE_S).values():
                        tensors.typed_tensor_proto(value)
        finally:
            self.outcomes = counted


def session_config(intra_op_threads: int, inter_op_threads: int):
    """The ConfigProto of a served Session, as TF Serving builds it from its two flags.

    TensorFlow gives every Session of a process the intra-op pool of the first one created (or
    of the eager context, if it came first), so the server also sets the process's threads
    before it loads anything (``startup.pin_threads``).

    Args:
        intra_op_threads: threads within one op (0: one per core).
        inter_op_threads: threads running independent ops (0: one per core).

    Returns:
        The ``tf.compat.v1.ConfigProto``.
    """
    return tf.compat.v1.ConfigProto(intra_op_parallelism_threads=intra_op_threads,
                                    inter_op_parallelism_threads=inter_op_threads)  # fmt: skip


def _load(path: Path, config=None):
    """Returns (Session, MetaGraphDef) of a SavedModel loaded with the serve tag."""
    session = tf.compat.v1.Session(graph=tf.Graph(), config=config)
    try:
        with session.graph.as_default():
            meta = tf.compat.v1.saved_model.loader.load(session, [names.SERVE_TAG], str(path))
    except Exception:
        session.close()
        raise
    return session, meta


def _max_chars(session, signatures: dict) -> int | None:
    """The export's cap on num_chars (the metadata signature's max_chars), if it has one."""
    metadata = signatures.get(names.METADATA)
    if metadata is None or names.MAX_CHARS not in metadata.outputs:
        return None
    try:
        return int(session.run(metadata.outputs[names.MAX_CHARS].name))
    except tf.errors.OpError:
        return None


def _warmup_records(path: Path) -> list | None:
    """The PredictRequests of a SavedModel's warm-up file, or None without the file."""
    records = path / names.WARMUP_DIR / names.WARMUP_FILE
    if not records.is_file():
        return None
    return [prediction_log_pb2.PredictionLog.FromString(raw).predict_log.request
            for raw in tf.compat.v1.io.tf_record_iterator(str(records))]  # fmt: skip


def _warm_up(session, signatures: dict, path: Path | None = None) -> None:
    records = None if path is None else _warmup_records(path)
    if records is not None:
        for request in records:
            signature = signatures.get(request.model_spec.signature_name or names.SERVING_DEFAULT)
            if signature is None:
                continue
            feed = {info.name: tensors.input_array(alias, request.inputs[alias], info)
                    for alias, info in signature.inputs.items()}  # fmt: skip
            session.run({k: v.name for k, v in signature.outputs.items()}, feed)
        return
    for name, signature in signatures.items():
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
            session.run({k: v.name for k, v in signature.outputs.items()}, feed)
        except tf.errors.OpError as e:  # a signature that needs real inputs; not fatal
            log.debug("warm-up of %s skipped: %s", name, tensors.clean_message(e.message))


def _cost(arrays: dict) -> int:
    """Rows x (longest prime in bytes + largest num_chars) of a generate request, the work of
    its loops (they run to the longest row); 0 for other signatures."""
    if names.NUM_CHARS not in arrays or names.PRIME not in arrays:
        return 0
    primes = arrays[names.PRIME].ravel()
    longest = max((len(p) for p in primes), default=0)
    most = int(np.max(arrays[names.NUM_CHARS], initial=0))
    return len(primes) * (max(most, 0) + longest)
