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

from charrnn_keras.errors import ServingError
from charrnn_keras.serving import names
from charrnn_keras.serving.lanes import Call, RequestError
from charrnn_keras.serving.policy import read_model_config
from charrnn_keras.serving.servable import typed_tensor_proto
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

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def Predict(self, request, context):  # noqa: N802 (gRPC method names)
        def call():
            with self.manager.acquire(request.model_spec) as loaded:
                outputs = loaded.predict(
                    request, timeout=context.time_remaining(), call=Call.of(context)
                )
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

    def __init__(self, manager: ModelManager, server, port: int, poll_seconds: float):
        self.manager, self.server, self.port = manager, server, port
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
    max_workers: int = 16,
    heavy_slots: int = 1,
    max_load_retries: int = MAX_LOAD_RETRIES,
    load_retry_seconds: float = LOAD_RETRY_SECONDS,
    model_config_file=None,
) -> RunningServer:
    """Loads the highest version of a model and starts serving it (returns at once).

    Args:
        export_dir: TF Serving's base directory (``export/<model-name>/<version>/``).
        model_name: the model to serve.
        host: the address to bind; 127.0.0.1 for this machine only, 0.0.0.0 for all.
        port: the port; 0 picks a free one (see ``RunningServer.port``).
        poll_seconds: how often to look for a newly exported version.
        max_workers: requests handled at the same time.
        heavy_slots: long generations run at once (each in a Session of its own); up to
            half of ``max_workers`` more wait, so the other half stays free for short ones.
        max_load_retries: attempts after a failed load (TF Serving's ``--max_num_load_retries``).
        load_retry_seconds: seconds between them (``--load_retry_interval_micros``).
        model_config_file: a ModelServerConfig text proto, TF Serving's ``--model_config_file``
            (e.g. ``export/models.config``): the model's base_path, model_version_policy and
            version_labels (``policy``); default: the highest version under export_dir.

    Returns:
        The RunningServer.
    """
    config = None if model_config_file is None else read_model_config(model_config_file, model_name)
    manager = ModelManager(
        export_dir, model_name, max_load_retries=max_load_retries,
        load_retry_seconds=load_retry_seconds, heavy_slots=heavy_slots,
        heavy_queue=max(1, max_workers // 2 - heavy_slots), policy=config,
    )  # fmt: skip
    # Without SO_REUSEPORT a second server on a taken port fails instead of sharing it silently.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), options=[("grpc.so_reuseport", 0)]
    )
    prediction_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(manager), server)
    model_grpc.add_ModelServiceServicer_to_server(ModelServicer(manager), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc raises this when the address is taken or not ours
        bound = 0
    if not bound:
        manager.close()
        raise ServingError(f"cannot listen on {host}:{port}; is another server using the port?")
    server.start()
    log.info("gRPC server for %s listening on %s:%d", model_name, host, bound)
    return RunningServer(manager, server, bound, poll_seconds)


def serve(export_dir="export", model_name: str = "charrnn", host="127.0.0.1", port=8500,
          model_config_file=None) -> None:  # fmt: skip
    """Serves until interrupted; see ``start_server`` for the arguments."""
    running = start_server(
        export_dir, model_name, host=host, port=port, model_config_file=model_config_file
    )
    try:
        running.wait()
    finally:
        running.stop(grace=None)
