"""TF Serving's REST API and Prometheus endpoint: paths, bodies, HTTP codes, metrics."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import REPO
from prometheus_client.parser import text_string_to_metric_families

from charrnn_keras import cli
from charrnn_keras.errors import ServingError
from charrnn_keras.export import export_run
from charrnn_keras.serving import names
from charrnn_keras.serving.client import Client
from charrnn_keras.serving.lanes import RequestError
from charrnn_keras.serving.metrics import DEFAULT_PATH, Metrics, prometheus_path
from charrnn_keras.serving.rest import RestApi
from charrnn_keras.serving.server import start_server

MODEL = "charrnn"
ROWS = [
    {"prime": "the cat", "num_chars": 12, "temperature": 0.8, "top_k": 0, "top_p": 1.0,
     "seed": [3, 0], "strategy": "sample"},
    {"prime": "dog", "num_chars": 5, "temperature": 1.5, "top_k": 4, "top_p": 0.9,
     "seed": [7, 1], "strategy": "sample"},
    {"prime": "", "num_chars": 0, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
     "seed": [0, 0], "strategy": "words"},
]  # fmt: skip


@pytest.fixture(scope="module")
def export_dir(tiny_run, tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("export")
    export_run(tiny_run, export_dir, MODEL)
    return export_dir


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    config = tmp_path_factory.mktemp("monitoring") / "monitoring.config"
    config.write_text("prometheus_config {\n  enable: true\n}\n")
    with start_server(export_dir, MODEL, port=0, rest_api_port=0, poll_seconds=0.2,
                      monitoring_config_file=config) as running:  # fmt: skip
        yield running


def http(server, method: str, path: str, body=None) -> tuple[int, str, bytes]:
    """Sends one request to the REST port; returns (status, content type, body)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.rest_port}{path}", data=data, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers.get("Content-Type"), answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def call(server, method: str, path: str, body=None) -> tuple[int, dict]:
    status, content_type, raw = http(server, method, path, body)
    assert content_type == "application/json"
    return status, json.loads(raw)


def predict(server, body, path=f"/v1/models/{MODEL}:predict") -> tuple[int, dict]:
    return call(server, "POST", path, body)


def grpc_texts(server, rows) -> list[str]:
    with Client(f"127.0.0.1:{server.port}", MODEL) as client:
        return client.generate(
            [r["prime"] for r in rows], num_chars=[r["num_chars"] for r in rows],
            temperature=[r["temperature"] for r in rows], top_k=[r["top_k"] for r in rows],
            seed=[r["seed"] for r in rows], top_p=[r["top_p"] for r in rows],
            strategy=[r["strategy"] for r in rows],
        )  # fmt: skip


def test_rest_row_and_columnar_formats_give_the_grpc_text(server):
    expected = grpc_texts(server, ROWS)
    assert len(expected[0]) == 12 and expected[2] == ""
    status, answer = predict(server, {"signature_name": "generate", "instances": ROWS})
    assert (status, answer) == (200, {"predictions": expected})
    columns = {key: [row[key] for row in ROWS] for key in ROWS[0]}
    status, answer = predict(server, {"signature_name": "generate", "inputs": columns})
    assert (status, answer) == (200, {"outputs": expected})
    # serving_default is generate; a version in the path; binary strings as {"b64": ...}.
    rows = [dict(ROWS[0], prime={"b64": base64.b64encode(b"the cat").decode()})]
    status, answer = predict(server, {"instances": rows}, f"/v1/models/{MODEL}/versions/1:predict")
    assert (status, answer) == (200, {"predictions": expected[:1]})


def test_model_status_and_metadata_as_tf_serving_writes_them(server):
    available = {"version": "1", "state": "AVAILABLE",
                 "status": {"error_code": "OK", "error_message": ""}}  # fmt: skip
    assert call(server, "GET", f"/v1/models/{MODEL}") == (
        200, {"model_version_status": [available]})  # fmt: skip
    assert call(server, "GET", f"/v1/models/{MODEL}/versions/1")[1] == {
        "model_version_status": [available]
    }
    status, answer = call(server, "GET", f"/v1/models/{MODEL}/metadata")
    assert status == 200
    assert answer["model_spec"] == {"name": MODEL, "signature_name": "", "version": "1"}
    signatures = answer["metadata"]["signature_def"]["signature_def"]
    assert {names.GENERATE, names.STEP, names.METADATA, names.SERVING_DEFAULT} <= set(signatures)
    generate = signatures[names.GENERATE]
    assert generate["method_name"] == names.PREDICT_METHOD
    assert generate["inputs"][names.PRIME]["dtype"] == "DT_STRING"
    assert generate["inputs"][names.SEED]["tensor_shape"]["dim"][1]["size"] == "2"


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/v1/models/nosuch"), ("GET", f"/v1/models/{MODEL}/versions/9"),
     ("GET", "/v1/models/nosuch/metadata"), ("GET", f"/v1/models/{MODEL}/versions/9/metadata"),
     ("POST", "/v1/models/nosuch:predict"), ("POST", f"/v1/models/{MODEL}/versions/9:predict")],
)  # fmt: skip
def test_unknown_model_or_version_is_404(server, method, path):
    body = {"instances": ROWS[:1]} if method == "POST" else None
    status, answer = call(server, method, path, body)
    assert status == 404 and list(answer) == ["error"]
    assert "nosuch" in answer["error"] or "9" in answer["error"]


BAD = [
    (b"{not json", 400, "JSON Parse error"),
    (b"", 400, "The document is empty"),
    (b"[1, 2]", 400, "Is not object"),
    ({"instances": []}, 400, "No values in 'instances' array"),
    ({"rows": ROWS}, 400, "Missing 'inputs' or 'instances' key"),
    ({"instances": ROWS, "inputs": {}}, 400, "expecting only one of"),
    ({"signature_name": 3, "instances": ROWS}, 400, "'signature_name' key must be a string"),
    ({"signature_name": "nosuch", "instances": ROWS}, 400, 'Serving signature name: "nosuch"'),
    ({"signature_name": "metadata", "instances": ROWS}, 400, "Failed to get input map"),
    ({"instances": [dict(ROWS[0], num_chars="many")]}, 400, "is not of expected type: int32"),
    ({"instances": [dict(ROWS[0], num_chars=2**40)]}, 400, "is not of expected type: int32"),
    ({"instances": [dict(ROWS[0], seed=[1, 2, 3])], "signature_name": "generate"}, 400,
     "has shape [1, 3]"),
    ({"instances": [ROWS[0], dict(ROWS[1], seed=[1])]}, 400, "Expecting tensor size: 2"),
    ({"instances": [{k: v for k, v in ROWS[0].items() if k != "seed"}]}, 400,
     "keys must be equal to"),
    ({"instances": [dict(ROWS[0], extra=1)]}, 400, "does not have named input: extra"),
    ({"instances": ["the cat"]}, 400, "instances is a plain list"),
    ({"inputs": {"prime": ["a"]}}, 400, "Missing named input"),
    ({"instances": [dict(ROWS[0], prime={"b64": "%%%"})]}, 400, "Unable to base64 decode"),
    ({"instances": [dict(ROWS[0], num_chars=-1)]}, 400, "num_chars"),
    ({"instances": [dict(ROWS[0], temperature=-1.0)]}, 400, "temperature"),
]  # fmt: skip


@pytest.mark.parametrize("body, code, message", BAD)
def test_bad_predict_bodies_get_tf_servings_codes_and_the_server_keeps_serving(
    server, body, code, message
):
    status, answer = predict(server, body)
    assert status == code and list(answer) == ["error"]
    assert message in answer["error"]
    assert "\n" not in answer["error"]
    assert predict(server, {"instances": ROWS[:1]})[0] == 200


@pytest.mark.parametrize(
    "method, path, code",
    [("POST", f"/v1/models/{MODEL}:classify", 501), ("POST", f"/v1/models/{MODEL}:PREDICT", 400),
     ("POST", f"/v1/models/{MODEL}", 400), ("PUT", f"/v1/models/{MODEL}:predict", 400),
     ("GET", "/v1/models", 400), ("GET", f"/v1/models/{MODEL}/versions/99999999999999999999", 400)],
)  # fmt: skip
def test_malformed_paths(server, method, path, code):
    status, answer = call(server, method, path, {"instances": ROWS[:1]})
    assert status == code and list(answer) == ["error"]


def test_paths_outside_v1_are_404(server):
    assert http(server, "GET", "/v2/models/charrnn")[0] == 404
    assert http(server, "GET", "/")[0] == 404


@pytest.mark.parametrize(
    "code, status",
    [(grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.FAILED_PRECONDITION, 400),
     (grpc.StatusCode.NOT_FOUND, 404), (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
     (grpc.StatusCode.UNAVAILABLE, 503), (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
     (grpc.StatusCode.CANCELLED, 499), (grpc.StatusCode.UNIMPLEMENTED, 501),
     (grpc.StatusCode.INTERNAL, 500)],
)  # fmt: skip
def test_grpc_codes_map_to_tf_servings_http_statuses(code, status):
    class Refusing:
        model_name = MODEL

        @contextlib.contextmanager
        def acquire(self, spec):
            raise RequestError(code, "refused")
            yield

    metrics = Metrics()
    api = RestApi(Refusing(), metrics)
    got, body = api.handle("POST", f"/v1/models/{MODEL}:predict", b'{"instances": [1]}', None)
    assert (got, json.loads(body)) == (status, {"error": "refused"})
    assert metrics.request_count.labels(MODEL, "serving_default", code.name)._value.get() == 1


def scrape(server) -> dict:
    """{(metric name, sorted labels): value} from the Prometheus page."""
    status, content_type, raw = http(server, "GET", DEFAULT_PATH)
    assert status == 200 and content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(raw.decode())
            for s in family.samples}  # fmt: skip


def test_metrics_count_grpc_and_rest_requests_by_model_signature_and_status(server):
    ok = (":tensorflow:serving:request_count_total",
          (("model_name", MODEL), ("signature_name", "generate"), ("status", "OK")))  # fmt: skip
    bad = (ok[0], (("model_name", MODEL), ("signature_name", "serving_default"),
                   ("status", "INVALID_ARGUMENT")))  # fmt: skip
    rows = ("charrnn_request_batch_size_count",
            (("model_name", MODEL), ("signature_name", "generate")))  # fmt: skip
    rows_sum = ("charrnn_request_batch_size_sum", rows[1])
    two_rows = ("charrnn_request_batch_size_bucket", tuple(sorted((*rows[1], ("le", "2.0")))))
    before = scrape(server)
    assert predict(server, {"signature_name": "generate", "instances": ROWS})[0] == 200
    grpc_texts(server, ROWS[:2])
    assert predict(server, {"instances": [dict(ROWS[0], top_k="x")]})[0] == 400
    after = scrape(server)
    assert after[ok] - before.get(ok, 0) == 2
    assert after[bad] - before.get(bad, 0) == 1
    assert after[rows] - before.get(rows, 0) == 2
    assert after[rows_sum] - before.get(rows_sum, 0) == 5  # 3 rows over REST, 2 over gRPC
    assert after[two_rows] - before.get(two_rows, 0) == 1
    for api, entrypoint in [("predict", "REST"), ("Predict", "GRPC")]:
        latency = (":tensorflow:serving:request_latency_count",
                   (("API", api), ("entrypoint", entrypoint), ("model_name", MODEL)))  # fmt: skip
        assert after[latency] > before.get(latency, 0)


def test_metrics_page_is_off_without_a_monitoring_config(export_dir):
    with start_server(export_dir, MODEL, port=0, rest_api_port=0) as running:
        assert http(running, "GET", DEFAULT_PATH)[0] == 404
        assert call(running, "GET", f"/v1/models/{MODEL}")[0] == 200


def test_monitoring_config_is_tf_servings_text_proto(tmp_path):
    config = tmp_path / "monitoring.config"
    config.write_text('prometheus_config { enable: true, path: "/metrics" }')
    assert prometheus_path(config) == "/metrics"
    config.write_text("prometheus_config { enable: true }")
    assert prometheus_path(config) == DEFAULT_PATH
    config.write_text("prometheus_config { enable: false }")
    assert prometheus_path(config) is None
    assert prometheus_path(None) is None
    config.write_text("prometheus { on: 1 }")
    with pytest.raises(ServingError, match="is not a MonitoringConfig"):
        prometheus_path(config)


def test_a_taken_rest_port_is_refused_in_one_line(export_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServingError, match="REST API") as error:
            start_server(export_dir, MODEL, port=0, rest_api_port=taken.getsockname()[1])
    assert "\n" not in str(error.value)


def test_cli_takes_tf_servings_flag_spellings():
    parser = cli.build_parser()
    for flag in ("--rest-api-port", "--rest_api_port"):
        args = parser.parse_args(["serve", flag, "8501", "--monitoring_config_file", "m.config"])
        assert (args.rest_api_port, args.monitoring_config_file) == (8501, "m.config")
    assert parser.parse_args(["serve"]).rest_api_port == 0


def test_step_row_format_answers_every_output_per_row_as_grpc_does(server):
    with Client(f"127.0.0.1:{server.port}", MODEL) as client:
        logits, states = client.step([1, 2])
        size = client.metadata()[names.RNN_SIZE]
    zeros = [0.0] * size
    row = {name: zeros for name in states}
    instances = [dict(row, char_ids=[1]), dict(row, char_ids=[2])]
    status, answer = predict(server, {"signature_name": "step", "instances": instances})
    assert status == 200 and len(answer["predictions"]) == 2
    for b, prediction in enumerate(answer["predictions"]):
        assert set(prediction) == {names.LOGITS, *states}
        # float32 written as its shortest decimal reads back as the same float32
        assert np.array_equal(np.float32(prediction[names.LOGITS]), logits[b])
        for name, value in states.items():
            assert np.array_equal(np.float32(prediction[name]), value[b])


def test_a_rest_client_that_hangs_up_stops_its_long_generation(server):
    row = dict(ROWS[0], num_chars=10_000)
    body = json.dumps({"instances": [row] * 64}).encode()
    before = server.manager.outcomes.snapshot().get("cancelled", 0)
    with socket.create_connection(("127.0.0.1", server.rest_port)) as connection:
        connection.sendall(
            b"POST /v1/models/%s:predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
            % (MODEL.encode(), len(body))
            + body
        )
        time.sleep(0.5)
    deadline = time.monotonic() + 20
    while server.manager.outcomes.snapshot().get("cancelled", 0) == before:
        assert time.monotonic() < deadline, "the generation ran on after its client left"
        time.sleep(0.05)
    assert predict(server, {"instances": ROWS[:1]})[0] == 200


def test_charrnn_serve_rest_api_port_and_monitoring_config(export_dir, tmp_path):
    config = tmp_path / "monitoring.config"
    config.write_text('prometheus_config { enable: true, path: "/metrics" }')
    with socket.socket() as probe:  # a free port: the CLI's 0 means off, as in TF Serving
        probe.bind(("127.0.0.1", 0))
        rest_port = probe.getsockname()[1]
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "charrnn_keras.cli", "serve", "--export-dir", str(export_dir),
            "--port", "0", "--rest_api_port", str(rest_port), "--monitoring_config_file",
            str(config)]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 120
        while f"REST API for {MODEL} listening on 127.0.0.1:{rest_port}" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        running = types.SimpleNamespace(rest_port=rest_port)
        assert call(running, "GET", f"/v1/models/{MODEL}")[0] == 200
        status, _, page = http(running, "GET", "/metrics")
        assert status == 200 and b":tensorflow:serving:request_count_total{" in page
    finally:
        proc.send_signal(signal.SIGINT)  # charrnn serve stops on Ctrl-C
        try:
            assert proc.wait(30) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
