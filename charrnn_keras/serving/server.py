"""A small gRPC server with TF Serving's API, for machines without ``tensorflow_model_server``.

It implements ``tensorflow.serving.PredictionService`` (Predict, GetModelMetadata; Classify,
Regress and MultiInference answer UNIMPLEMENTED) and ``ModelService.GetModelStatus`` for one
model, with TF Serving's behaviour: the highest version under ``export/<model>/`` is served (or
those ``--model_config_file``'s model_version_policy names) and a newly exported one is picked
up without a restart (polled, like TF Serving's file system
source) and versions are managed as TF Serving manages them (``versions``). Versions run in
graph-mode Sessions (``servable``); Sessions are thread-safe and the SavedModel keeps no state,
so requests run concurrently, long generations in a lane of their own (``lanes``) that stops
them when their client leaves.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2
from tensorflow_serving.apis import model_service_pb2_grpc as model_grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc as prediction_grpc

from charrnn_keras import startup
from charrnn_keras.errors import ServingError
from charrnn_keras.serving import names
from charrnn_keras.serving.lanes import Call, RequestError
from charrnn_keras.serving.metrics import Metrics, prometheus_path
from charrnn_keras.serving.policy import read_model_config
from charrnn_keras.serving.servable import INTRA_OP_THREADS
from charrnn_keras.serving.tensors import typed_tensor_proto
from charrnn_keras.serving.versions import LOAD_RETRY_SECONDS, MAX_LOAD_RETRIES, ModelManager

log = logging.getLogger(__name__)


def _answer(context, call):
    """Runs ``call()``; a RequestError becomes the gRPC status TF Serving would answer."""
    try:
        return call()
    except RequestError as e:
        context.abort(e.code, str(e))


class PredictionServicer(prediction_grpc.PredictionServiceServicer):
    """PredictionService: Predict and GetModelMetadata over a ModelManager."""

    def __init__(self, manager: ModelManager, metrics: Metrics | None = None):
        self.manager, self.metrics = manager, metrics or Metrics()

    def Predict(self, request, context):  # noqa: N802 (gRPC method names)
        def call():
            spec = request.model_spec
            with self.metrics.track(spec.name, "Predict", "GRPC") as tracked:
                tracked.signature_name = spec.signature_name or names.SERVING_DEFAULT
                with self.manager.acquire(spec) as loaded:
                    outputs = loaded.predict(
                        request, timeout=context.time_remaining(), call=Call.of(context)
                    )
                tracked.request = request
            response = predict_pb2.PredictResponse()
            response.model_spec.name = self.manager.model_name
            response.model_spec.version.value = loaded.version
            response.model_spec.signature_name = (
                request.model_spec.signature_name or names.SERVING_DEFAULT
            )
            for alias, value in outputs.items():
                response.outputs[alias].CopyFrom(typed_tensor_proto(value))
            return response

        return _answer(context, call)

    def GetModelMetadata(self, request, context):  # noqa: N802
        def call():
            if not request.metadata_field:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "GetModelMetadataRequest must specify at least one metadata_field",
                )
            for field in request.metadata_field:
                if field != "signature_def":
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported"
                    )
            with self.manager.acquire(request.model_spec) as loaded:
                signatures = get_model_metadata_pb2.SignatureDefMap()
                for key, signature in loaded.signatures.items():
                    signatures.signature_def[key].CopyFrom(signature)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = self.manager.model_name
            response.model_spec.version.value = loaded.version
            response.metadata["signature_def"].Pack(signatures)
            return response

        return _answer(context, call)

    def _unimplemented(self, what, context):
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{what} is not supported by this model; use Predict with the generate signature",
        )

    def Classify(self, request, context):  # noqa: N802
        self._unimplemented("Classify", context)

    def Regress(self, request, context):  # noqa: N802
        self._unimplemented("Regress", context)

    def MultiInference(self, request, context):  # noqa: N802
        self._unimplemented("MultiInference", context)


class ModelServicer(model_grpc.ModelServiceServicer):
    """ModelService: GetModelStatus (HandleReloadConfigRequest stays UNIMPLEMENTED)."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request, context):  # noqa: N802
        def call():
            response = get_model_status_pb2.GetModelStatusResponse()
            response.model_version_status.extend(self.manager.status(request.model_spec))
            return response

        return _answer(context, call)


class RunningServer:
    """A started server: ``port`` is the bound port; ``stop()`` ends it (also on ``with`` exit).

    Args:
        manager: the ModelManager it serves.
        server: the started grpc.Server.
        port: the bound port.
        poll_seconds: how often the export directory is checked for new versions.
    """

    def __init__(self, manager: ModelManager, server, port: int, poll_seconds: float,
                 rest=None):  # fmt: skip
        self.manager, self.server, self.port = manager, server, port
        self.rest = rest  # the RestServer, if --rest_api_port is on
        self.rest_port = None if rest is None else rest.port
        self._stopped = threading.Event()
        self._poller = threading.Thread(
            target=self._poll, args=(poll_seconds,), name="charrnn-version-poll", daemon=True
        )
        self._poller.start()

    def _poll(self, seconds: float) -> None:
        while not self._stopped.wait(seconds):
            try:
                self.manager.refresh()
            except Exception:  # keep serving whatever happens to the directory
                log.exception("checking %s for new versions failed", self.manager.model_dir)

    def wait(self) -> None:
        self.server.wait_for_termination()

    def stop(self, grace: float | None = 1.0) -> None:
        self._stopped.set()
        if self.rest is not None:
            self.rest.stop()
        self.server.stop(grace).wait()
        self._poller.join()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_server(
    export_dir="export",
    model_name: str = "charrnn",
    host: str = "127.0.0.1",
    port: int = 8500,
    poll_seconds: float = 1.0,
    max_workers: int = 64,
    heavy_slots: int = 1,
    max_load_retries: int = MAX_LOAD_RETRIES,
    load_retry_seconds: float = LOAD_RETRY_SECONDS,
    rest_api_port: int | None = None,
    monitoring_config_file=None,
    model_config_file=None,
    intra_op_threads: int = INTRA_OP_THREADS,
    inter_op_threads: int = 0,
) -> RunningServer:
    """Loads the highest version of a model and starts serving it (returns at once).

    Args:
        export_dir: TF Serving's base directory (``export/<model-name>/<version>/``).
        model_name: the model to serve.
        host: the address to bind; 127.0.0.1 for this machine only, 0.0.0.0 for all.
        port: the port; 0 picks a free one (see ``RunningServer.port``).
        poll_seconds: how often to look for a newly exported version.
        max_workers: requests handled at the same time. A request of a batched export holds
            a worker while it waits for its batch, so this also bounds the batch: 64, the
            default batches' largest size (16 made batches of at most 16 rows at 64 clients).
        heavy_slots: long generations run at once (each in a Session of its own); up to
            half of ``max_workers`` more wait, so the other half stays free for short ones.
        max_load_retries: attempts after a failed load (TF Serving's ``--max_num_load_retries``).
        load_retry_seconds: seconds between them (``--load_retry_interval_micros``).
        rest_api_port: the port of TF Serving's REST API (``rest``); None is off (TF Serving's
            0, which here picks a free port, as ``port`` 0 does).
        monitoring_config_file: a MonitoringConfig text proto that enables the Prometheus page
            on the REST port (TF Serving's ``--monitoring_config_file``).
        model_config_file: a ModelServerConfig text proto, TF Serving's ``--model_config_file``
            (e.g. ``export/models.config``): the model's base_path, model_version_policy and
            version_labels (``policy``); default: the highest version under export_dir.
        intra_op_threads: threads within one op (TF Serving's
            ``--tensorflow_intra_op_parallelism``; 0 is one per core).
        inter_op_threads: threads running ops side by side
            (``--tensorflow_inter_op_parallelism``; 0 is one per core).

    Returns:
        The RunningServer.
    """
    metrics_path = prometheus_path(monitoring_config_file)
    if metrics_path is not None and rest_api_port is None:
        raise ServingError("the Prometheus metrics are served on the REST port: set a REST port")
    config = None if model_config_file is None else read_model_config(model_config_file, model_name)
    startup.pin_threads(intra_op_threads, inter_op_threads)
    manager = ModelManager(
        export_dir, model_name, max_load_retries=max_load_retries,
        load_retry_seconds=load_retry_seconds, heavy_slots=heavy_slots,
        heavy_queue=max(1, max_workers // 2 - heavy_slots), policy=config,
        intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads,
    )  # fmt: skip
    # Without SO_REUSEPORT a second server on a taken port fails instead of sharing it silently.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), options=[("grpc.so_reuseport", 0)]
    )
    metrics = Metrics()
    prediction_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(manager, metrics), server
    )
    model_grpc.add_ModelServiceServicer_to_server(ModelServicer(manager), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc raises this when the address is taken or not ours
        bound = 0
    if not bound:
        manager.close()
        raise ServingError(f"cannot listen on {host}:{port}; is another server using the port?")
    rest = None
    if rest_api_port is not None:
        from charrnn_keras.serving.rest import RestApi, RestServer  # aiohttp only when asked

        try:
            rest = RestServer(RestApi(manager, metrics), host, rest_api_port, metrics_path,
                              max_workers)  # fmt: skip
        except ServingError:
            server.stop(None)
            manager.close()
            raise
    server.start()
    log.info("gRPC server for %s listening on %s:%d", model_name, host, bound)
    if rest is not None:  # logged after gRPC's line, which scripts wait for first
        log.info("REST API for %s listening on %s:%d%s", model_name, host, rest.port,
                 f", metrics at {metrics_path}" if metrics_path else "")  # fmt: skip
    return RunningServer(manager, server, bound, poll_seconds, rest)


def serve(export_dir="export", model_name: str = "charrnn", host="127.0.0.1", port=8500,
          rest_api_port: int | None = None, monitoring_config_file=None,
          model_config_file=None, intra_op_threads: int = INTRA_OP_THREADS,
          inter_op_threads: int = 0) -> None:  # fmt: skip
    """Serves until interrupted; see ``start_server`` for the arguments."""
    running = start_server(export_dir, model_name, host=host, port=port,
                           rest_api_port=rest_api_port,
                           monitoring_config_file=monitoring_config_file,
                           model_config_file=model_config_file,
                           intra_op_threads=intra_op_threads,
                           inter_op_threads=inter_op_threads)  # fmt: skip
    try:
        running.wait()
    finally:
        running.stop(grace=None)
