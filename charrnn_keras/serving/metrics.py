"""TF Serving's request metrics, in Prometheus form, for gRPC and REST requests alike.

TF Serving records, per request, ``/tensorflow/serving/request_count`` (labels ``model_name``,
``status``: the gRPC code's name) and, for requests that succeed,
``/tensorflow/serving/request_latency`` (microseconds; labels ``model_name``, ``API``,
``entrypoint``), and its Prometheus exporter turns every character of a name that Prometheus
cannot hold into ':', so the exposed names start with ``:tensorflow:serving:``
(``tensorflow_serving/util/prometheus_exporter.cc``). Here:

- the names keep that spelling (a leading ':' is legal in Prometheus names);
- ``request_count`` has one more label, ``signature_name``, so that requests can be counted by
  signature; and ``prometheus_client`` exposes every counter with OpenMetrics' ``_total``
  suffix (``:tensorflow:serving:request_count_total``, with a ``_created`` gauge beside it),
  which only a process-wide switch could change;
- as in TF Serving, gRPC counts Predict only, while REST counts every ``/v1/`` request (a GET
  with ``API`` "" and ``signature_name`` "");
- TF Serving has no batch-size metric for Predict (``request_example_counts`` counts
  tf.Examples of Classify and Regress), so the rows of each predict request go to a histogram
  of our own, ``charrnn_request_batch_size``, with the buckets TF Serving uses for examples.

The endpoint is switched on, as in TF Serving, by ``--monitoring_config_file``: a
``MonitoringConfig`` text proto, ``prometheus_config { enable: true path: "..." }``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from charrnn_keras.errors import ServingError
from charrnn_keras.serving import names
from charrnn_keras.serving.lanes import RequestError

# PrometheusExporter::kPrometheusPath, used when the config names no path.
DEFAULT_PATH = "/monitoring/prometheus/metrics"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# TF Serving's buckets: monitoring::Buckets::Exponential(10, 1.8, 33) microseconds (10 us to
# about 20 minutes) for latency, Exponential(1, 2, 15) for examples per request.
# Six significant digits, as TF Serving prints them (absl::StrCat), not 32.400000000000006.
LATENCY_BUCKETS_US = [float(f"{10 * 1.8**i:.6g}") for i in range(33)]
BATCH_BUCKETS = [2.0**i for i in range(15)]


def _monitoring_config_class():
    """TF Serving's MonitoringConfig message (tensorflow_serving/config/monitoring_config.proto).

    tensorflow-serving-api ships no ``monitoring_config_pb2``, so the two messages are declared
    here exactly as the .proto declares them, and text_format parses the file as TF Serving's
    C++ ``ParseProtoTextFile`` does.
    """
    proto = descriptor_pb2.FileDescriptorProto(
        name="charrnn/tensorflow_serving/config/monitoring_config.proto",
        package="tensorflow.serving",
        syntax="proto3",
    )
    field = descriptor_pb2.FieldDescriptorProto
    prometheus = proto.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=field.TYPE_BOOL, label=field.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    config = proto.message_type.add(name="MonitoringConfig")
    config.field.add(
        name="prometheus_config",
        number=1,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_OPTIONAL,
        type_name=".tensorflow.serving.PrometheusConfig",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")
    )


def prometheus_path(config_file: str | Path | None) -> str | None:
    """Reads a ``--monitoring_config_file``; returns the metrics path, or None when disabled.

    Args:
        config_file: the MonitoringConfig text proto, or None (no monitoring, TF Serving's
            default).

    Returns:
        The path the metrics are served on (``/monitoring/prometheus/metrics`` unless the file
        names another), or None when the file does not enable Prometheus.
    """
    if config_file is None:
        return None
    try:
        text = Path(config_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ServingError(f"cannot read monitoring config {config_file}: {e}") from None
    config = _monitoring_config_class()()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ServingError(
            f"monitoring config {config_file} is not a MonitoringConfig: {e}"
        ) from None
    if not config.prometheus_config.enable:
        return None
    path = config.prometheus_config.path or DEFAULT_PATH
    if not path.startswith("/"):
        raise ServingError(f"monitoring config {config_file}: path {path!r} must start with '/'")
    return path


def batch_size(request) -> int | None:
    """The rows of a PredictRequest: the first dimension of its inputs (None if scalar)."""
    for alias in sorted(request.inputs, key=lambda a: a != names.PRIME):
        dims = request.inputs[alias].tensor_shape.dim
        if dims:
            return dims[0].size
    return None


@dataclass
class Tracked:
    """What one tracked request learns as it runs: its signature and its PredictRequest."""

    signature_name: str = ""
    request: object = None


class Metrics:
    """The request metrics of one server, in a registry of its own.

    A registry per server, not prometheus_client's global one, so that two servers in one
    process (tests, a reload) count apart.
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        self.request_count = Counter(
            ":tensorflow:serving:request_count",
            "The total number of requests.",
            ["model_name", "signature_name", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ["model_name", "API", "entrypoint"],
            buckets=LATENCY_BUCKETS_US,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "charrnn_request_batch_size",
            "Rows (batch size) of each successful predict request.",
            ["model_name", "signature_name"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )

    @contextlib.contextmanager
    def track(self, model_name: str, api: str, entrypoint: str):
        """Counts the request the ``with`` block answers, by how it ends.

        A RequestError counts with its code's name; any other exception as UNKNOWN, as gRPC
        answers it. Latency is recorded for successful requests only, as TF Serving does.

        Args:
            model_name: the model the request names.
            api: TF Serving's ``API`` label (``Predict`` over gRPC; ``predict``, or "" for a
                GET, over REST, as TF Serving spells them).
            entrypoint: ``GRPC`` or ``REST``.

        Yields:
            A Tracked: set its ``signature_name`` once known, and its ``request`` (the
            PredictRequest) once it has run, for the batch-size histogram.
        """
        start, tracked = time.monotonic(), Tracked()
        try:
            yield tracked
        except RequestError as e:
            self._count(model_name, tracked, e.code)
            raise
        except Exception:
            self._count(model_name, tracked, grpc.StatusCode.UNKNOWN)
            raise
        self._count(model_name, tracked, grpc.StatusCode.OK)
        self.request_latency.labels(model_name, api, entrypoint).observe(
            (time.monotonic() - start) * 1e6
        )
        rows = None if tracked.request is None else batch_size(tracked.request)
        if rows is not None:
            self.batch_size.labels(model_name, tracked.signature_name).observe(rows)

    def _count(self, model_name: str, tracked: Tracked, code: grpc.StatusCode) -> None:
        self.request_count.labels(model_name, tracked.signature_name, code.name).inc()

    def page(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
