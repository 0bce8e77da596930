"""Request batching (issue 12): TF Serving's batching parameters, TensorFlow's BatchFunction op in
the graph, and versions served as TF Serving's model_version_policy and version_labels say."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc as prediction_grpc

from charrnn_keras import batching
from charrnn_keras.errors import ServingError
from charrnn_keras.export import export_run
from charrnn_keras.serving import names
from charrnn_keras.serving.lanes import HEAVY_COST
from charrnn_keras.serving.server import start_server

REPO = Path(__file__).resolve().parents[1]
INPUTS = [names.PRIME, names.NUM_CHARS, names.TEMPERATURE, names.TOP_K, names.TOP_P, names.SEED,
          names.STRATEGY]  # fmt: skip
DTYPES = [object, np.int32, np.float32, np.int32, np.float32, np.int64, object]


def random_requests(rng, count: int) -> list[list[tuple]]:
    """Requests of 1-3 rows with every setting drawn at random, one row with num_chars 0."""
    requests = []
    for _ in range(count):
        rows = []
        for _ in range(int(rng.integers(1, 4))):
            rows.append((
                rng.choice(["the cat", "", "dog\u00e9 s", "x", "\n"]).encode(),
                int(rng.integers(0, 40)), float(rng.choice([0.0, 0.5, 1.0, 1.7])),
                int(rng.choice([0, 1, 3])), float(rng.choice([1.0, 0.8])),
                [int(rng.integers(0, 2**40)), int(rng.integers(0, 9))],
                rng.choice([b"sample", b"words"]),
            ))  # fmt: skip
        requests.append(rows)
    requests[0][0] = (b"the", 0, 1.0, 0, 1.0, [7, 0], b"sample")
    return requests


def columns(rows: list[tuple]) -> dict:
    """{input name: numpy column} of generate rows."""
    return {name: np.array([r[i] for r in rows], dtype)
            for i, (name, dtype) in enumerate(zip(INPUTS, DTYPES, strict=True))}  # fmt: skip


def load(path):
    """(Session, generate SignatureDef) of a SavedModel, as TF Serving's graph-mode loader."""
    session = tf.compat.v1.Session(graph=tf.Graph())
    with session.graph.as_default():
        meta = tf.compat.v1.saved_model.loader.load(session, [names.SERVE_TAG], str(path))
    return session, meta.signature_def[names.GENERATE]


def run(session, signature, rows: list[tuple]) -> dict:
    feed = {signature.inputs[k].name: v for k, v in columns(rows).items()}
    return session.run({k: v.name for k, v in signature.outputs.items()}, feed)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def plain(tiny_run, export_dir) -> Path:
    """Version 1: the tiny run without batching in the graph."""
    return export_run(tiny_run, export_dir, "charrnn", version=1)


def test_export_writes_tf_serving_batching_parameters(plain, export_dir, tmp_path):
    path = export_dir / batching.BATCHING_PARAMETERS
    params = text_format.Parse(path.read_text(), batching.parameters_class()())
    assert params.max_batch_size.value == batching.DEFAULTS["max_batch_size"]
    assert list(params.allowed_batch_sizes) == batching.DEFAULTS["allowed_batch_sizes"]
    assert params.num_batch_threads.value >= 1 and params.batch_timeout_micros.value > 0
    # The wire format is TF Serving's: field 1 max_batch_size (Int64Value), 6 allowed sizes.
    wire = batching.parameters_class()(allowed_batch_sizes=[4])
    wire.max_batch_size.value = 4
    assert wire.SerializeToString() == b"\x0a\x02\x08\x04\x32\x01\x04"
    # A tuned file survives the next export.
    path.write_text("max_batch_size { value: 8 }\n")
    batching.read_parameters(path)
    assert export_dir.joinpath(names.MODELS_CONFIG).is_file()
    bad = tmp_path / "bad.txt"
    for text, words in [("max_batch_size: 3", "is not a BatchingParameters text proto"),
                        ("max_batch_size { value: 4 } allowed_batch_sizes: [2, 3]",
                         "must increase and end with max_batch_size")]:  # fmt: skip
        bad.write_text(text)
        with pytest.raises(ServingError, match=words) as e:
            batching.read_parameters(bad)
        assert "\n" not in str(e.value)


def merge_as_batching_session(requests, params) -> list[tuple[list[tuple], int]]:
    """Merges requests as TF Serving's BatchingSession does: in order up to max_batch_size rows,
    padded to the next allowed size with copies of the last request's first row.

    Returns:
        (batch rows, real rows) pairs.
    """
    batches, rows = [], []
    for request in requests:
        if rows and len(rows) + len(request) > params.max_batch_size.value:
            batches.append(rows)
            rows = []
        rows = rows + request
    batches.append(rows)
    padded = []
    for rows in batches:
        size = next(s for s in params.allowed_batch_sizes if s >= len(rows))
        padded.append((rows + [rows[-1]] * (size - len(rows)), len(rows)))
    return padded


def test_requests_merged_as_tf_serving_batches_equal_requests_alone(plain, tmp_path):
    # Stock TF Serving --enable_batching concatenates requests, so each row must not depend
    # on its batch-mates, its position or the padding.
    parameters = tmp_path / "p.txt"
    parameters.write_text("max_batch_size { value: 8 } allowed_batch_sizes: [2, 4, 8]")
    params = batching.read_parameters(parameters)
    requests = random_requests(np.random.default_rng(12), 7)
    session, signature = load(plain)
    alone = [list(run(session, signature, r)[names.TEXT]) for r in requests]
    merged = []
    for rows, real in merge_as_batching_session(requests, params):
        assert len(rows) in params.allowed_batch_sizes
        merged += list(run(session, signature, rows)[names.TEXT])[:real]
    assert merged == [text for texts in alone for text in texts]
    assert [len(t.decode()) for t in merged] == [r[1] for req in requests for r in req]


# A fresh process, as TF Serving's C++ loader would be: graph-mode load with the serve tag,
# concurrent Session runs from threads.
_LOADER = """
import json, sys, threading
import numpy as np, tensorflow as tf
sys.path.insert(0, sys.argv[3])
from test_batching import load, run
requests = json.loads(sys.argv[2])
requests = [[(r[0].encode("latin-1"), *r[1:6], r[6].encode()) for r in q] for q in requests]
session, signature = load(sys.argv[1])
# A first run builds the Session's executor for these feeds (seconds on a busy machine): done
# once here, with a full batch of 6 rows that runs at once, so the threads below meet in time.
rows = [r for q in requests for r in q]
run(session, signature, (rows * 2)[:6])
out = [None] * len(requests)
def go(i):
    out[i] = run(session, signature, requests[i])
threads = [threading.Thread(target=go, args=(i,)) for i in range(len(requests))]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps([[o["text"].astype(object).tolist(), o["batch_size"].tolist()] for o in out],
                 default=lambda b: b.decode("latin-1")))
"""


@pytest.fixture(scope="module")
def batched(tiny_run, export_dir, tmp_path_factory) -> Path:
    """Version 2: batched in the graph; a batch closes when 6 rows wait or after 3 s."""
    path = tmp_path_factory.mktemp("params") / "batching.txt"
    path.write_text(
        "max_batch_size { value: 6 } batch_timeout_micros { value: 3000000 } "
        "num_batch_threads { value: 1 } allowed_batch_sizes: [3, 6]"
    )
    return export_run(tiny_run, export_dir, "charrnn", version=2, batching_parameters_file=path)


def test_batch_function_merges_concurrent_session_runs(plain, batched):
    requests = random_requests(np.random.default_rng(5), 3)
    requests = [requests[0][:2], requests[1][:1], requests[2][:2]]  # 5 rows: padded to 6
    big = random_requests(np.random.default_rng(6), 4)
    big = [row for request in big for row in request][:7]  # over max_batch_size: runs alone
    assert len(big) == 7
    wire = [[(r[0].decode("latin-1"), *r[1:6], r[6].decode()) for r in q] for q in requests]
    result = subprocess.run(
        [sys.executable, "-c", _LOADER, str(batched), json.dumps(wire), str(REPO / "tests")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.splitlines()[-1])
    session, signature = load(plain)
    for request, (texts, sizes) in zip(requests, answers, strict=True):
        alone = [t.decode("latin-1") for t in run(session, signature, request)[names.TEXT]]
        assert texts == alone  # its own rows, in its own order, whatever else was in the batch
        # One batch: the 5 rows of 3 requests, padded to 6 by the op.
        assert sizes == [6] * len(request)
    # Padding and splitting leave a row's length alone: num_chars 0 stays empty.
    assert answers[0][0][0] == ""
    batched_session, batched_signature = load(batched)
    out = run(batched_session, batched_signature, big)
    assert list(out[names.BATCH_SIZE]) == [7] * 7
    assert list(out[names.TEXT]) == list(run(session, signature, big)[names.TEXT])


def predict_request(rows: list[tuple], version: int | None = None, label: str = ""):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "charrnn"
    request.model_spec.signature_name = names.GENERATE
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    for name, value in columns(rows).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def test_expired_request_does_not_fail_its_batch(plain, batched):
    # TensorFlow runs a batch under its last request's Session run: were that run cancelled
    # at its deadline, every row of the batch would fail. 1) the expired request waits first
    # (the batch waits up to 3 s for 6 rows); 2) it comes last, into a batch that runs long.
    alone_session, signature = load(plain)
    flat = [row for request in random_requests(np.random.default_rng(8), 6) for row in request]
    # As long as a request can be without counting as heavy (HEAVY_COST): a batch that runs long.
    long_row = [(b"the", HEAVY_COST - 96, 1.0, 0, 1.0, [3, 0], b"sample")]
    phases = [(flat[:1], [flat[1:4], flat[4:6]]), (flat[6:7], [long_row, flat[7:11]])]
    started = time.perf_counter()
    long_text = run(alone_session, signature, long_row + flat[6:11])[names.TEXT][0]
    # Phase 2's deadline must pass while its batch runs, however fast the machine runs it.
    deadlines = [0.5, min(0.5, (time.perf_counter() - started) / 4)]
    # A row's text is the text it gets alone (test_serving), so the timed run gives the long
    # row's: another generation of 4,000 characters would cost the suite seconds.
    expected = [[[long_text] if rows is long_row else
                 list(run(alone_session, signature, rows)[names.TEXT]) for rows in others]
                for _, others in phases]  # fmt: skip
    # No heavy lane: its Session's warm-up would wait out the 3 s batch timeout twice more.
    with start_server(export_dir=batched.parent.parent, port=0, poll_seconds=3600,
                      heavy_slots=0) as server:  # fmt: skip
        loaded = server.manager.current
        assert loaded.version == 2
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = prediction_grpc.PredictionServiceStub(channel)
            for phase, (expiring, others) in enumerate(phases):
                answers = [None] * len(others)

                def ask(i, rows, answers=answers):
                    answers[i] = stub.Predict(predict_request(rows), timeout=120)

                threads = [threading.Thread(target=ask, args=(i, r)) for i, r in enumerate(others)]
                if phase == 1:  # the expired request last: the others are running first
                    [t.start() for t in threads]
                    while loaded.in_use < len(others):
                        threading.Event().wait(0.01)
                with pytest.raises(grpc.RpcError) as e:
                    stub.Predict(predict_request(expiring), timeout=deadlines[phase])
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                if phase == 0:
                    [t.start() for t in threads]
                [t.join() for t in threads]
                for answer, texts in zip(answers, expected[phase], strict=True):
                    assert answer is not None
                    assert list(tf.make_ndarray(answer.outputs[names.TEXT])) == texts
                    assert set(tf.make_ndarray(answer.outputs[names.BATCH_SIZE])) == {6}


def write_config(path: Path, base: Path, policy: str, labels: dict) -> Path:
    """Writes a ModelServerConfig text proto with TF Serving's message."""
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add(
        name="charrnn", base_path=str(base / "charrnn"), model_platform="tensorflow"
    )
    text_format.Parse(policy, model.model_version_policy)
    model.version_labels.update(labels)
    path.write_text(text_format.MessageToString(config))
    return path


@pytest.fixture
def four_versions(plain, tmp_path) -> Path:
    """export/charrnn/1..3 (copies of one model) and 4, which does not load."""
    import shutil

    base = tmp_path / "export"
    for version in (1, 2, 3):
        shutil.copytree(plain, base / "charrnn" / str(version))
    (base / "charrnn" / "4").mkdir()
    (base / "charrnn" / "4" / "saved_model.pb").write_bytes(b"not a SavedModel")
    return base


def test_versions_and_labels_as_tf_serving_manages_them(four_versions, tmp_path):
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    config = write_config(tmp_path / "models.config", four_versions,
                          "latest { num_versions: 2 }", {"stable": 2, "canary": 3})  # fmt: skip
    rows = [(b"the", 5, 1.0, 0, 1.0, [1, 0], b"sample")]
    # base_path comes from the config: export_dir is not used.
    with start_server(export_dir=tmp_path / "unused", port=0, poll_seconds=3600,
                      model_config_file=config, max_load_retries=0,
                      heavy_slots=0) as server:  # fmt: skip
        assert server.manager.served == [2, 3]  # 4 fails: the two highest that load
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = prediction_grpc.PredictionServiceStub(channel)
            for version, label, served in [(None, "", 3), (None, "stable", 2),
                                           (None, "canary", 3), (2, "", 2)]:  # fmt: skip
                answer = stub.Predict(predict_request(rows, version, label), timeout=60)
                assert answer.model_spec.version.value == served
            for version, label, code, message in [
                (None, "beta", grpc.StatusCode.INVALID_ARGUMENT,
                 "Unrecognized servable version label: beta"),
                (1, "", grpc.StatusCode.NOT_FOUND,
                 "Servable not found for request: Specific(charrnn, 1)"),
            ]:  # fmt: skip
                with pytest.raises(grpc.RpcError) as e:
                    stub.Predict(predict_request(rows, version, label), timeout=60)
                assert (e.value.code(), e.value.details()) == (code, message)
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = "charrnn"
            status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request)
            states = {s.version: s for s in status.model_version_status}
            assert states[4].state == get_model_status_pb2.ModelVersionStatus.END
            assert states[4].status.error_message  # why version 4 did not load
            assert states[3].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


@pytest.mark.parametrize(
    "policy, served",
    [
        ("all {}", [1, 2, 3]),
        ("specific { versions: 1 versions: 3 versions: 9 }", [1, 3]),
        ("", [3]),
    ],  # fmt: skip
)
def test_model_version_policies(four_versions, tmp_path, policy, served):
    from charrnn_keras.serving.policy import read_model_config
    from charrnn_keras.serving.versions import ModelManager

    config = write_config(tmp_path / "models.config", four_versions, policy, {})
    manager = ModelManager(four_versions, "charrnn", max_load_retries=0, heavy_slots=0,
                           policy=read_model_config(config, "charrnn"))  # fmt: skip
    try:
        assert manager.served == served
    finally:
        manager.close()


def test_served_sessions_get_the_servers_threads(four_versions):
    from charrnn_keras.serving.versions import ModelManager

    # TensorFlow keeps a process's first intra-op pool, so the config is what can be checked.
    manager = ModelManager(four_versions, "charrnn", intra_op_threads=3, inter_op_threads=2)
    try:
        loaded = manager.current
        assert loaded.session._config.intra_op_parallelism_threads == 3
        assert loaded.session._config.inter_op_parallelism_threads == 2
        lane = loaded._lane_session()  # a heavy lane Session: the same intra-op threads
        assert lane._config.intra_op_parallelism_threads == 3
        lane.close()
    finally:
        manager.close()


def test_a_label_on_a_version_not_served_is_refused(four_versions, tmp_path):
    from charrnn_keras import cli

    config = write_config(tmp_path / "models.config", four_versions, "", {"stable": 2})
    with pytest.raises(ServingError, match="Request to assign label to version 2 of model "
                       "charrnn, which is not currently available for inference"):  # fmt: skip
        start_server(export_dir=four_versions, port=0, model_config_file=config, heavy_slots=0)
    with pytest.raises(ServingError, match="lists no model named 'other'"):
        start_server(export_dir=four_versions, model_name="other", model_config_file=config)
    for flag in ("--model_config_file", "--model-config-file"):
        args = cli.build_parser().parse_args(["serve", flag, str(config)])
        assert args.model_config_file == str(config)
    args = cli.build_parser().parse_args(["export", "--batching-parameters-file", "b.txt"])
    assert args.batching_parameters_file == "b.txt"
    assert cli.build_parser().parse_args(["export"]).kernel == "auto"
    assert cli.build_parser().parse_args(["export", "--kernel", "matvec"]).kernel == "matvec"


def test_export_keeps_a_models_config_policy(four_versions, tmp_path):
    from charrnn_keras.serving.policy import read_model_config, write_models_config

    config = write_config(four_versions / names.MODELS_CONFIG, four_versions,
                          "latest { num_versions: 2 }", {"stable": 2})  # fmt: skip
    write_models_config(four_versions)  # as the next export does
    policy = read_model_config(config, "charrnn")
    assert (policy.kind, policy.num_versions, policy.labels) == ("latest", 2, {"stable": 2})
