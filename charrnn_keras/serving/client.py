"""A gRPC client for an exported model, served by TF Serving or by ``charrnn serve``.

Example::

    with Client("localhost:8500", "charrnn") as client:
        text = client.generate("the ", num_chars=200, temperature=0.8, seed=1)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from charrnn_keras.errors import ServingError
from charrnn_keras.serving import names

log = logging.getLogger(__name__)

_MAX_MESSAGE = 64 * 1024 * 1024  # a batch of long replies exceeds gRPC's 4 MiB default


class RequestFailed(ServingError):
    """The server refused or could not answer a request; ``code`` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Client:
    """Talks to one model on a TF Serving gRPC endpoint; use it as a context manager.

    Args:
        server: ``host:port`` of the server.
        model_name: the served model's name.
        timeout: seconds to wait for each reply.
        version: ask for this version (default: the latest served).
    """

    def __init__(
        self,
        server: str = "localhost:8500",
        model_name: str = "charrnn",
        timeout: float = 30.0,
        version: int | None = None,
    ):
        if version is not None:  # the ModelSpec's int64; protobuf would raise a ValueError
            version = names.check_int("version", version, "int64", minimum=0)
        self.server, self.model_name, self.timeout, self.version = (
            server, model_name, timeout, version)  # fmt: skip
        options = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
        ]
        self._channel = grpc.insecure_channel(server, options=options)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._metadata: dict | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _spec(self, message, signature: str | None = None) -> None:
        message.model_spec.name = self.model_name
        if self.version is not None:
            message.model_spec.version.value = self.version
        if signature is not None:
            message.model_spec.signature_name = signature

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            code, lines = e.code(), (e.details() or "").strip().splitlines()
            detail = lines[0] if lines else ""
            if code == grpc.StatusCode.UNAVAILABLE:
                message = f"cannot reach {self.server} ({detail}); is the server running?"
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                message = f"no answer from {self.server} within {self.timeout} s"
            else:
                message = f"{self.server} answered {code.name}: {detail}"
            raise RequestFailed(code, message) from None

    def predict(self, signature: str, inputs: dict, output_filter: Sequence[str] = ()) -> dict:
        """Runs one Predict call.

        Args:
            signature: the signature name ("" means serving_default).
            inputs: {input name: numpy array or value with the signature's dtype}.
            output_filter: output names to return (default: all).

        Returns:
            {output name: numpy array}.
        """
        request = predict_pb2.PredictRequest()
        self._spec(request, signature)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        request.output_filter.extend(output_filter)
        response = self._call(self._predict.Predict, request)
        return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}

    def generate(
        self,
        prime: str | Sequence[str],
        num_chars: int | Sequence[int] = 500,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        seed=0,
        top_p: float | Sequence[float] = 1.0,
        strategy: str | Sequence[str] = "sample",
    ) -> str | list[str]:
        """Generates text in one round trip with the ``generate`` signature.

        Every setting is one value for all rows or a list with one value per prime; each row
        gets exactly the text it would get alone.

        Args:
            prime: the text to start from, or a list of primes for a batch; characters outside
                the vocabulary are skipped, and an empty prime starts from a newline.
            num_chars: characters to generate.
            temperature: 0 is argmax; higher is more random.
            top_k: draw only among the k most likely characters (0 = all); more than the
                vocabulary size, like a negative temperature, is refused (INVALID_ARGUMENT).
            seed: ``S`` (the same as ``charrnn sample --seed S``) or a stateless pair
                ``[a, b]``; for a list of primes, an ``S`` for every row or a list with one
                seed per prime.
            top_p: nucleus sampling: only the most likely characters whose probabilities add
                up to ``top_p`` (1 = all).
            strategy: ``sample``, or ``words`` (draw only at the start of a word).

        Numbers that do not fit the signature's dtypes (int32 ``num_chars`` and ``top_k``,
        float32 ``temperature``, int64 ``seed``) raise ServingError before anything is sent.

        Returns:
            The generated continuation (without the prime); a list for a list of primes.
        """
        single = isinstance(prime, str)
        primes = [prime] if single else list(prime)
        if not primes:
            return []
        rows = len(primes)
        if single or np.ndim(seed) == 0:
            seeds = [_seed_pair(seed)] * rows
        else:
            seeds = [_seed_pair(s) for s in _per_row(seed, rows, "seed")]
        # Checked here: numpy would wrap or overflow a value outside the signature's dtypes.
        int32s = {
            name: [names.check_int(name, v) for v in _per_row(value, rows, name)]
            for name, value in ((names.NUM_CHARS, num_chars), (names.TOP_K, top_k))
        }
        float32s = {
            name: [names.check_float32(name, v) for v in _per_row(value, rows, name)]
            for name, value in ((names.TEMPERATURE, temperature), (names.TOP_P, top_p))
        }
        out = self.predict(
            names.GENERATE,
            {
                names.PRIME: np.array([p.encode("utf-8") for p in primes], dtype=object),
                **{name: np.array(values, np.int32) for name, values in int32s.items()},
                **{name: np.array(values, np.float32) for name, values in float32s.items()},
                names.SEED: np.array(seeds, np.int64).reshape(rows, 2),
                names.STRATEGY: np.array(
                    [s.encode() for s in _per_row(strategy, rows, "strategy")], dtype=object
                ),
            },
        )
        texts = [t.decode("utf-8") for t in out[names.TEXT]]
        return texts[0] if single else texts

    def step(self, char_ids, states: dict | None = None) -> tuple[np.ndarray, dict]:
        """Runs one character per row with explicit state (the ``step`` signature).

        Args:
            char_ids: int ids, ``[batch]`` or ``[batch, 1]``.
            states: the states a previous ``step`` returned, or None for zeros.

        Returns:
            ``(logits [batch, vocab], states)``; pass ``states`` to the next call.
        """
        ids = np.asarray(char_ids, dtype=np.int32).reshape(-1, 1)
        if states is None:
            meta = self.metadata()
            zeros = np.zeros([len(ids), meta[names.RNN_SIZE]], np.float32)
            states = {name: zeros for name in meta[names.STATE_NAMES]}
        out = self.predict(names.STEP, {names.CHAR_IDS: ids, **states})
        logits = out.pop(names.LOGITS)
        return logits, out

    def metadata(self) -> dict:
        """Returns the ``metadata`` signature's outputs: strings decoded, scalars as Python."""
        if self._metadata is None:
            raw = self.predict(names.METADATA, {})
            meta = {}
            for key, value in raw.items():
                value = value.tolist()
                if isinstance(value, bytes):
                    value = value.decode("utf-8")
                elif isinstance(value, list) and value and isinstance(value[0], bytes):
                    value = [v.decode("utf-8") for v in value]
                meta[key] = value
            self._metadata = meta
        return self._metadata

    def signature_defs(self) -> dict:
        """Returns the served SignatureDefs (GetModelMetadata), keyed by signature name."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request)
        response = self._call(self._predict.GetModelMetadata, request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        return dict(signatures.signature_def)

    def status(self, details: bool = False) -> dict:
        """Returns {version: state name} from ModelService.GetModelStatus, e.g. {2: 'AVAILABLE'}.

        Args:
            details: return {version: (state name, error code name, error message)} instead;
                a version that failed to load has its error there, e.g.
                ``('END', 'DATA_LOSS', "Error parsing message...")``; ``('AVAILABLE', 'OK', '')``.
        """
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request)
        response = self._call(self._models.GetModelStatus, request)
        state = get_model_status_pb2.ModelVersionStatus.State
        codes = {code.value[0]: code.name for code in grpc.StatusCode}
        if not details:
            return {s.version: state.Name(s.state) for s in response.model_version_status}
        return {
            s.version: (state.Name(s.state), codes.get(s.status.error_code, "UNKNOWN"),
                        s.status.error_message)
            for s in response.model_version_status
        }  # fmt: skip


def _seed_pair(seed) -> list[int]:
    pair = [seed, 0] if np.ndim(seed) == 0 else list(seed)
    if len(pair) != 2:
        raise ServingError(f"a seed is S or a pair [a, b], got {seed!r}")
    return [names.check_int("seed", s, "int64") for s in pair]


def _per_row(value, rows: int, name: str) -> list:
    """``value`` for every row, or the list of per-row values after checking its length."""
    if isinstance(value, str) or np.ndim(value) == 0:
        return [value] * rows
    values = list(value)
    if len(values) != rows:
        raise ServingError(
            f"{name} has {len(values)} values for {rows} primes; give one or one per prime"
        )
    return values
