"""TF Serving's REST API (``--rest_api_port``) and its Prometheus endpoint, on aiohttp.

The paths, bodies, errors and HTTP statuses are TF Serving's
(``model_servers/http_rest_api_handler.cc``, ``http_rest_api_util.cc``, ``http_server.cc``):

- ``GET /v1/models/<name>[/versions/<v>|/labels/<l>]``: GetModelStatus as JSON;
- ``GET /v1/models/<name>[...]/metadata``: the signature defs as JSON;
- ``POST /v1/models/<name>[...]:predict``: the row or columnar format (``json_tensor``);
- errors as ``{"error": "..."}`` with the gRPC code mapped to an HTTP status.

A request runs as a gRPC Predict does: the same ModelManager and ``LoadedVersion.predict``, so
both give the same text, with TF Serving's REST deadline (``--rest_api_timeout_in_ms``, 30 s).
aiohttp's event loop runs in a thread of its own next to the gRPC server and hands each request
to a thread pool, since a Session run blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import threading
from urllib.parse import unquote

import grpc
from aiohttp import web
from google.protobuf import json_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
)

from charrnn_keras.errors import ServingError
from charrnn_keras.serving import json_tensor, names
from charrnn_keras.serving.lanes import Call, RequestError
from charrnn_keras.serving.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

_PREDICT = re.compile(
    r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
    r":(classify|regress|predict)"
)
_STATUS = re.compile(
    r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
    r"(?:/(metadata))?"
)
_V1 = re.compile(r"(?i)/v1/.*")
_C = grpc.StatusCode
# http_server.cc ToHTTPStatusCode.
HTTP_STATUS = {
    _C.OK: 200, _C.CANCELLED: 499, _C.UNKNOWN: 500, _C.INVALID_ARGUMENT: 400,
    _C.DEADLINE_EXCEEDED: 504, _C.NOT_FOUND: 404, _C.ALREADY_EXISTS: 409,
    _C.PERMISSION_DENIED: 403, _C.RESOURCE_EXHAUSTED: 429, _C.FAILED_PRECONDITION: 400,
    _C.ABORTED: 409, _C.OUT_OF_RANGE: 400, _C.UNIMPLEMENTED: 501, _C.INTERNAL: 500,
    _C.UNAVAILABLE: 503, _C.DATA_LOSS: 500, _C.UNAUTHENTICATED: 401,
}  # fmt: skip
REST_TIMEOUT_S = 30.0  # TF Serving's --rest_api_timeout_in_ms default
# Bodies above this are refused (413) before they are read whole. JSON spells a tensor in a
# few times the bytes of gRPC's 4 MiB message limit.
MAX_BODY_BYTES = 16 * 1024 * 1024
_INT64_MAX = 2**63 - 1


def _bad(message: str) -> RequestError:
    return RequestError(_C.INVALID_ARGUMENT, message)


def _proto_json(message) -> dict:
    return json.loads(
        json_format.MessageToJson(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )


class RestApi:
    """Answers one REST request (blocking): the routing and handlers of http_rest_api_handler.

    Args:
        manager: the ModelManager the gRPC servicers use.
        metrics: where requests are counted.
        timeout_s: the deadline of each predict request.
    """

    def __init__(self, manager, metrics: Metrics, timeout_s: float = REST_TIMEOUT_S):
        self.manager, self.metrics, self.timeout_s = manager, metrics, timeout_s

    def handle(self, method: str, path: str, body: bytes, call: Call) -> tuple[int, bytes]:
        """Returns (HTTP status, JSON body) for a request under ``/v1/``.

        Args:
            method: the HTTP method.
            path: the request path, still percent-encoded.
            body: the request body.
            call: cancelled when the client goes away.

        Returns:
            The HTTP status and the JSON answer.
        """
        match = (
            (_PREDICT if method == "POST" else _STATUS).fullmatch(path)
            if method in ("POST", "GET")
            else None
        )
        model, version, label, verb = ("", "", "", "") if match is None else match.groups("")
        api = verb if method == "POST" else ""  # TF Serving's API label: "" for a GET
        model = unquote(model)
        try:
            with self.metrics.track(model, api, "REST") as tracked:
                answer = self._dispatch(
                    method, path, body, call, tracked, match, model, version, unquote(label), verb
                )
            return 200, answer
        except RequestError as e:
            if HTTP_STATUS.get(e.code, 500) >= 500:
                log.warning("REST %s %s failed: %s: %s", method, path, e.code.name, e)
            return HTTP_STATUS.get(e.code, 500), _dumps({"error": str(e)})
        except Exception as e:  # answer, and keep serving, whatever a request does
            log.exception("REST %s %s failed", method, path)
            return 500, _dumps({"error": " ".join(f"{type(e).__name__}: {e}".split())})

    def _dispatch(self, method, path, body, call, tracked, match, model, version, label, verb):
        spec = model_pb2.ModelSpec(name=model)
        if version:
            if len(version) > 19 or int(version) > _INT64_MAX:  # absl::SimpleAtoi into int64
                raise _bad(f"Failed to convert version: {version} to numeric.")
            spec.version.value = int(version)
        if label:
            spec.version_label = label
        if match is None:
            raise _bad(f"Malformed request: {method} {path}")
        if method == "POST":
            if verb == "predict":
                return self._predict(spec, body, call, tracked)
            if verb in ("classify", "regress"):  # as our gRPC answers them
                raise RequestError(
                    _C.UNIMPLEMENTED,
                    f"{verb.capitalize()} is not supported "
                    f"by this model; use predict with the generate signature",
                )
            raise _bad(f"Malformed request: {method} {path}")  # the path ignores case; not the verb
        if not model:
            raise _bad("Missing model name in request.")
        if verb == "metadata":
            return self._metadata(spec)
        response = get_model_status_pb2.GetModelStatusResponse()
        response.model_version_status.extend(self.manager.status(spec))
        for status in response.model_version_status:
            status.status.SetInParent()  # TF Serving always fills it: error_code OK
        return _dumps(_proto_json(response))

    def _predict(self, spec, body: bytes, call: Call, tracked) -> bytes:
        doc = json_tensor.parse_body(body)
        spec.signature_name = doc.get("signature_name", "")
        tracked.signature_name = spec.signature_name or names.SERVING_DEFAULT
        with self.manager.acquire(spec) as loaded:
            signature = loaded.signatures.get(tracked.signature_name)
            if signature is None:
                raise _bad(
                    f'Serving signature name: "{tracked.signature_name}" not found in signature def'
                )
            if not signature.inputs:
                raise _bad(
                    f"Failed to get input map for signature: {spec.signature_name or 'DEFAULT'}"
                )
            request = predict_pb2.PredictRequest(model_spec=spec)
            inputs, fmt = json_tensor.fill_inputs(doc, signature.inputs)
            for alias, proto in inputs.items():
                request.inputs[alias].CopyFrom(proto)
            outputs = loaded.predict(request, timeout=self.timeout_s, call=call)
        tracked.request = request
        return _dumps(json_tensor.make_json(outputs, fmt))

    def _metadata(self, spec) -> bytes:
        with self.manager.acquire(spec) as loaded:
            signatures = get_model_metadata_pb2.SignatureDefMap()
            for key, signature in loaded.signatures.items():
                signatures.signature_def[key].CopyFrom(signature)
            answered = model_pb2.ModelSpec(name=self.manager.model_name)
            answered.version.value = loaded.version
        return _dumps(
            {
                "model_spec": _proto_json(answered),
                "metadata": {"signature_def": _proto_json(signatures)},
            }
        )


def _dumps(answer: dict) -> bytes:
    return json.dumps(answer, ensure_ascii=False, indent=4).encode("utf-8")


class RestServer:
    """The REST API (and the Prometheus page, if enabled) served from a thread of its own.

    Args:
        api: the RestApi that answers ``/v1/`` requests.
        host: the address to bind.
        port: the port; 0 picks a free one (see ``port``).
        metrics_path: where the Prometheus page is served; None for nowhere.
        max_workers: requests run at the same time.
    """

    def __init__(
        self, api: RestApi, host: str, port: int, metrics_path: str | None, max_workers: int = 16
    ):
        self.api, self.metrics_path = api, metrics_path
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, "charrnn-rest")
        self._loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that hangs up cancels its handler, which stops the run.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(host, port, started), name="charrnn-rest", daemon=True
        )
        self._thread.start()
        try:
            self.port = started.result()
        except OSError:
            self._thread.join()
            self._pool.shutdown()
            raise ServingError(
                f"cannot listen on {host}:{port} for the REST API; is another server using it?"
            ) from None

    def _run(self, host: str, port: int, started: concurrent.futures.Future) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, host, port, reuse_port=False)
            self._loop.run_until_complete(site.start())
        except OSError as e:
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()
            started.set_exception(e)
            return
        started.set_result(self._runner.addresses[0][1])
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path
        loop = asyncio.get_running_loop()
        if self.metrics_path is not None and path == self.metrics_path:
            page = await loop.run_in_executor(self._pool, self.api.metrics.page)
            return web.Response(body=page, headers={"Content-Type": CONTENT_TYPE})
        if not _V1.fullmatch(path):
            return web.Response(status=404, text="Not Found")
        if request.method == "OPTIONS":  # a CORS preflight, answered as TF Serving does
            ok = re.search(r"https?://", request.headers.get("Origin", ""))
            return web.Response(status=200 if ok else 400)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _json_response(
                413, _dumps({"error": f"the request body is larger than {MAX_BODY_BYTES} bytes"})
            )
        call = Call()
        work = loop.run_in_executor(self._pool, self.api.handle, request.method, path, body, call)
        try:
            status, answer = await work
        except asyncio.CancelledError:  # the client hung up: stop its run, if it is long
            call.cancel()
            raise
        return _json_response(status, answer)

    def stop(self) -> None:
        """Stops listening and ends the thread; requests still running get a second."""
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _json_response(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, headers={"Content-Type": "application/json"})
