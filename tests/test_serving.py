"""The gRPC server and client: TF Serving's API, errors, concurrency, new versions."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from charrnn_keras import cli
from charrnn_keras.errors import CharRNNError, ServingError
from charrnn_keras.export import export_run
from charrnn_keras.generation import Generator, load_sampling_model
from charrnn_keras.sampling import Sampler
from charrnn_keras.serving import names
from charrnn_keras.serving.client import Client, RequestFailed
from charrnn_keras.serving.lanes import RequestError
from charrnn_keras.serving.server import start_server

MODEL = "charrnn"
ROW_INPUTS = {names.NUM_CHARS, names.TEMPERATURE, names.TOP_K, names.TOP_P, names.STRATEGY}


@pytest.fixture(scope="module")
def export_dir(tiny_run, tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("export")
    export_run(tiny_run, export_dir, MODEL)
    return export_dir


@pytest.fixture(scope="module")
def one_version(export_dir) -> Path:
    """The module's exported version, to copy (a copy costs milliseconds, an export seconds)."""
    return export_dir / MODEL / "1"


@pytest.fixture(scope="module")
def server(export_dir):
    with start_server(export_dir, MODEL, host="127.0.0.1", port=0, poll_seconds=0.2) as running:
        yield running


@pytest.fixture(scope="module")
def address(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def in_process(export_dir):
    """generate(prime, n, temperature, top_k, seed) on the same SavedModel, without gRPC."""
    fn = tf.saved_model.load(str(export_dir / MODEL / "1")).signatures[names.GENERATE]

    def generate(prime, num_chars, temperature=1.0, top_k=0, seed=0):
        out = fn(
            prime=tf.constant([prime]), num_chars=tf.constant([num_chars]),
            temperature=tf.constant([temperature], tf.float32), top_k=tf.constant([top_k]),
            top_p=tf.constant([1.0]), seed=tf.constant([[seed, 0]], tf.int64),
            strategy=tf.constant(["sample"]),
        )  # fmt: skip
        return out[names.TEXT].numpy()[0].decode("utf-8")

    return generate


@pytest.fixture
def stub(address):
    with grpc.insecure_channel(address) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def generate_request(signature=names.GENERATE, **overrides) -> predict_pb2.PredictRequest:
    """A generate request; a scalar setting (or a [2] seed) is sent as one value per prime."""
    inputs = {
        names.PRIME: np.array([b"the "], object),
        names.NUM_CHARS: np.int32(10),
        names.TEMPERATURE: np.float32(1.0),
        names.TOP_K: np.int32(0),
        names.TOP_P: np.float32(1.0),
        names.SEED: np.array([1, 0], np.int64),
        names.STRATEGY: np.array(b"sample", object),
        **overrides,
    }
    rows = len(np.ravel(inputs[names.PRIME])) if inputs[names.PRIME] is not None else 1
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        if value is None:
            continue
        value = np.asarray(value, dtype=getattr(value, "dtype", None))
        if key == names.SEED and value.ndim == 1:
            value = np.stack([value] * rows)
        elif key != names.PRIME and value.ndim == 0 and key in ROW_INPUTS:
            value = np.full([rows], value, dtype=value.dtype)
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def test_generate_over_grpc(address, in_process):
    with Client(address, MODEL, timeout=30) as client:
        assert client.generate("the cat", 50, 0.8, 0, 7) == in_process("the cat", 50, 0.8, 0, 7)
        texts = client.generate(["the", "", "\u00e9"], 20, 1.0, 3, 2)
        assert isinstance(texts, list) and len(texts) == 3
        assert texts[0] == in_process("the", 20, 1.0, 3, 2)
        assert client.generate("the", 0) == ""


def test_generate_over_grpc_matches_sampler(tiny_run, address):
    sampler = Sampler.from_run_dir(tiny_run)
    with Client(address, MODEL) as client:
        for prime, temperature, top_k, seed in [("the dog", 1.0, 0, 11), ("", 0.0, 0, 0)]:
            expected = sampler.sample(
                sampler.prepare_prime(prime), 60, temperature=temperature, top_k=top_k, seed=seed
            )
            assert client.generate(prime, 60, temperature, top_k, seed) == expected


def test_step_metadata_and_status(tiny_run, address):
    model, cfg, vocab = load_sampling_model(tiny_run)
    with Client(address, MODEL) as client:
        meta = client.metadata()
        assert meta[names.CHARS] == vocab.chars
        generator = Generator(model, vocab)
        assert meta[names.STATE_NAMES] == [name for name, _ in generator.layout]
        assert meta[names.MAX_CHARS] == names.DEFAULT_MAX_CHARS
        assert meta[names.CELL] == cfg.model.cell and meta[names.FALLBACK_PRIME] == "\n"
        states, ours = None, generator.zero_states(2)
        for ids in ([1, 2], [0, 3], [4, 4]):
            logits, states = client.step(ids, states)  # outputs fed straight back
            expected, ours = generator.step(tf.constant(ids, tf.int32), ours)
            np.testing.assert_array_equal(logits, expected.numpy())
        assert set(states) == set(meta[names.STATE_NAMES])
        assert client.status() == {1: "AVAILABLE"}
        signatures = client.signature_defs()
        assert {names.GENERATE, names.SERVING_DEFAULT, names.STEP, names.METADATA} <= set(
            signatures
        )


def test_concurrent_clients_get_their_own_text(address):
    seeds = range(8)
    with Client(address, MODEL) as client:
        alone = {seed: client.generate("the ", 200, 1.0, 0, seed) for seed in seeds}
    got, errors = {}, []
    barrier = threading.Barrier(len(seeds))

    def worker(seed):
        try:
            with Client(address, MODEL) as client:
                barrier.wait()
                got[seed] = client.generate("the ", 200, 1.0, 0, seed)
        except Exception as e:  # reported below; an exception in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and got == alone
    assert len(set(got.values())) == len(seeds)


def test_empty_signature_name_output_filter_typed_fields(stub):
    response = stub.Predict(generate_request(signature=""), timeout=30)
    assert response.model_spec.signature_name == names.SERVING_DEFAULT
    assert response.model_spec.version.value == 1
    assert len(response.outputs[names.TEXT].string_val) == 1
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = MODEL, names.METADATA
    request.output_filter.extend([names.CODEPOINTS, names.RNN_SIZE])
    response = stub.Predict(request, timeout=30)
    assert set(response.outputs) == {names.CODEPOINTS, names.RNN_SIZE}
    codepoints = response.outputs[names.CODEPOINTS]
    assert codepoints.int64_val and not codepoints.tensor_content
    units = response.outputs[names.RNN_SIZE].int_val[0]
    step = predict_pb2.PredictRequest()
    step.model_spec.name, step.model_spec.signature_name = MODEL, names.STEP
    step.inputs[names.CHAR_IDS].CopyFrom(tf.make_tensor_proto(np.zeros([1, 1], np.int32)))
    for name in state_names(stub):
        step.inputs[name].CopyFrom(tf.make_tensor_proto(np.zeros([1, units], np.float32)))
    step.output_filter.append(names.LOGITS)
    response = stub.Predict(step, timeout=30)
    assert list(response.outputs) == [names.LOGITS]
    logits = response.outputs[names.LOGITS]
    assert len(logits.float_val) == len(codepoints.int64_val) and not logits.tensor_content


def state_names(stub) -> list[str]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = MODEL, names.METADATA
    request.output_filter.append(names.STATE_NAMES)
    response = stub.Predict(request, timeout=30)
    return [n.decode() for n in response.outputs[names.STATE_NAMES].string_val]


def _rpc_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_error_codes(stub, address):
    codes = grpc.StatusCode
    bad_model = generate_request()
    bad_model.model_spec.name = "nope"
    bad_version = generate_request()
    bad_version.model_spec.version.value = 99
    unfiltered = generate_request()
    unfiltered.output_filter.append("nope")
    cases = [
        (bad_model, codes.NOT_FOUND),
        (bad_version, codes.NOT_FOUND),
        (generate_request(signature="nope"), codes.FAILED_PRECONDITION),
        (generate_request(**{names.SEED: None}), codes.INVALID_ARGUMENT),
        (generate_request(**{names.NUM_CHARS: np.float32(3)}), codes.INVALID_ARGUMENT),
        (generate_request(**{names.SEED: np.array([1, 2, 3], np.int64)}), codes.INVALID_ARGUMENT),
        (generate_request(**{names.NUM_CHARS: np.int32(-1)}), codes.INVALID_ARGUMENT),
        (generate_request(**{names.NUM_CHARS: np.int32(10**6)}), codes.INVALID_ARGUMENT),
        (unfiltered, codes.INVALID_ARGUMENT),
    ]
    for request, code in cases:
        assert _rpc_code(lambda r=request: stub.Predict(r, timeout=30)) == code, request
    for method, request in [
        (stub.Classify, classification_pb2.ClassificationRequest()),
        (stub.Regress, regression_pb2.RegressionRequest()),
        (stub.MultiInference, inference_pb2.MultiInferenceRequest()),
    ]:
        assert _rpc_code(lambda m=method, r=request: m(r, timeout=30)) == codes.UNIMPLEMENTED
    no_fields = get_model_metadata_pb2.GetModelMetadataRequest()
    no_fields.model_spec.name = MODEL
    assert _rpc_code(lambda: stub.GetModelMetadata(no_fields)) == codes.INVALID_ARGUMENT
    with grpc.insecure_channel(address) as channel:
        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = "nope"
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        assert _rpc_code(lambda: models.GetModelStatus(status)) == codes.NOT_FOUND
    with (
        Client(address, MODEL) as client,
        pytest.raises(RequestFailed, match="num_chars must be from 0 to") as info,
    ):
        client.generate("the", names.DEFAULT_MAX_CHARS + 1)
    assert info.value.code == codes.INVALID_ARGUMENT and "\n" not in str(info.value)
    # The message the library gives, not TensorFlow's assert format around it.
    assert str(info.value).endswith(
        f"num_chars must be from 0 to {names.DEFAULT_MAX_CHARS}, got {names.DEFAULT_MAX_CHARS + 1}"
    ), str(info.value)


def test_new_version_is_served_without_restart(tiny_run, tmp_path):
    export_dir = tmp_path / "export"
    export_run(tiny_run, export_dir, MODEL)
    with start_server(export_dir, MODEL, port=0, poll_seconds=0.1, max_load_retries=0,
                      heavy_slots=0) as running:  # fmt: skip
        with Client(f"127.0.0.1:{running.port}", MODEL) as client:
            before = client.generate("the", 20, 1.0, 0, 1)
            export_run(tiny_run, export_dir, MODEL, max_chars=20)  # version 2
            deadline = time.monotonic() + 30
            while client.status().get(2) != "AVAILABLE":
                assert time.monotonic() < deadline, client.status()
                time.sleep(0.1)
            assert client.status() == {1: "END", 2: "AVAILABLE"}
            assert client.metadata()[names.MAX_CHARS] == 20
            assert client.generate("the", 20, 1.0, 0, 1) == before  # same weights, same text
            broken = export_dir / MODEL / "3"  # copied by hand, damaged: version 2 stays
            broken.mkdir()
            (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
            while client.status().get(3) != "END":
                assert time.monotonic() < deadline, client.status()
                time.sleep(0.1)
            assert client.status()[2] == "AVAILABLE"
            assert client.generate("the", 20, 1.0, 0, 1) == before
        with Client(f"127.0.0.1:{running.port}", MODEL, version=1) as old:
            with pytest.raises(RequestFailed) as info:
                old.generate("the", 5)
            assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_server_refuses_unusable_directories_and_taken_ports(tmp_path, export_dir, server):
    with pytest.raises(CharRNNError, match="does not exist"):
        start_server(tmp_path / "missing", MODEL, port=0)
    (tmp_path / "export" / MODEL / ".1.tmp123").mkdir(parents=True)  # half an export
    with pytest.raises(CharRNNError, match="no exported version"):
        start_server(tmp_path / "export", MODEL, port=0)
    with pytest.raises(CharRNNError, match="model name"):
        start_server(export_dir, "bad/name", port=0)
    with pytest.raises(CharRNNError, match="cannot listen"):
        start_server(export_dir, MODEL, port=server.port)


def test_cli_query(address, in_process, capsys):
    argv = ["query", "--server", address, "--prime", "the ", "-n", "30", "--seed", "4"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "the " + in_process("the ", 30, 1.0, 0, 4) + "\n"
    assert cli.main(["query", "--server", address, "--model-name", "nope", "-n", "3"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


def test_client_refuses_numbers_outside_the_signature_dtypes(address):
    """Issue 15, item 4: numpy would wrap or overflow them; one ServingError instead."""
    with Client(address, MODEL) as client:
        for kwargs, words in [
            ({"num_chars": 2**31}, "num_chars"),
            ({"top_k": 10**20}, "top_k"),
            ({"seed": 10**20}, "seed"),
            ({"seed": [1, -(2**63) - 1]}, "seed"),
            ({"temperature": 1e39}, "temperature"),
            ({"num_chars": 2.5}, "num_chars"),
        ]:
            with pytest.raises(ServingError, match=words) as info:
                client.generate("the", **kwargs)
            assert not isinstance(info.value, RequestFailed)  # refused before sending
        assert len(client.generate("the", 3, seed=[2**63 - 1, -(2**63)])) == 3
    with pytest.raises(ServingError, match="version"):
        Client(address, MODEL, version=2**63)


# ----------------------------------------------------------------------------- versions (item 9)


def _copy_version(src, dst, with_variables=True):
    dst.mkdir(parents=True)
    shutil.copy(src / "saved_model.pb", dst / "saved_model.pb")
    if with_variables:
        shutil.copytree(src / "variables", dst / "variables")


def test_versions_follow_their_folders_as_in_tf_serving(tiny_run, one_version, tmp_path):
    """Deleted versions are unloaded (the highest left is served), a half-copied version is
    loaded once complete, and a failed load says why in GetModelStatus."""
    export_dir = tmp_path / "export"
    v1 = export_dir / MODEL / "1"
    shutil.copytree(one_version, v1)
    export_run(tiny_run, export_dir, MODEL, max_chars=20)
    # The poller never runs here: refresh() is called by hand, so each step is deterministic.
    # No heavy lane (heavy_slots=0): a Session less to load and warm up for each version.
    with start_server(export_dir, MODEL, port=0, poll_seconds=3600, heavy_slots=0) as running:
        refresh = running.manager.refresh
        with Client(f"127.0.0.1:{running.port}", MODEL) as client:
            assert client.status() == {2: "AVAILABLE"}
            shutil.rmtree(export_dir / MODEL / "2")
            refresh()
            assert client.status() == {1: "AVAILABLE", 2: "END"}
            assert client.metadata()[names.MAX_CHARS] == names.DEFAULT_MAX_CHARS
            client._metadata = None
            # Half copied: saved_model.pb there, variables not yet.
            _copy_version(v1, export_dir / MODEL / "3", with_variables=False)
            refresh()
            state, code, message = client.status(details=True)[3]
            assert state == "LOADING" and code != "OK" and message, (state, code, message)
            assert client.status()[1] == "AVAILABLE"  # still serving the version before
            shutil.copytree(v1 / "variables", export_dir / MODEL / "3" / "variables")
            refresh()  # the files changed: tried again at once, not after the retry interval
            assert client.status(details=True)[3] == ("AVAILABLE", "OK", "")
            assert client.status()[1] == "END"
            for version in (1, 3):
                shutil.rmtree(export_dir / MODEL / str(version))
            refresh()
            assert set(client.status().values()) == {"END"}
            with pytest.raises(RequestFailed) as info:
                client.generate("the", 5)
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            shutil.copytree(one_version, export_dir / MODEL / "2")  # the number comes back
            refresh()
            assert client.status()[2] == "AVAILABLE" and len(client.generate("the", 5)) == 5


def test_only_version_broken_reports_why_and_load_retries(tmp_path, monkeypatch):
    from charrnn_keras.serving import versions

    broken = tmp_path / "export" / MODEL / "1"
    broken.mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    attempts = []
    real = versions.LoadedVersion

    def counted(*args, **kwargs):
        attempts.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(versions, "LoadedVersion", counted)
    now = [0.0]
    manager = versions.ModelManager(
        tmp_path / "export", MODEL, max_load_retries=2, load_retry_seconds=60, clock=lambda: now[0]
    )
    spec = predict_pb2.PredictRequest().model_spec
    spec.name = MODEL

    def status():
        (s,) = manager.status(spec)
        return get_model_status_pb2.ModelVersionStatus.State.Name(s.state), s.status

    try:
        state, error = status()
        assert state == "LOADING" and error.error_code != 0 and error.error_message
        manager.refresh()  # before the retry interval: not tried again
        assert attempts == [1]
        for t in (60.0, 120.0, 500.0):
            now[0] = t
            manager.refresh()
        assert attempts == [1, 1, 1]  # the first load and max_load_retries retries
        state, error = status()
        assert state == "END" and error.error_code != 0 and "SavedModel" in error.error_message
        with pytest.raises(RequestError) as info, manager.acquire(spec):
            pass
        assert info.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        manager.close()


def test_a_version_whose_warm_up_fails_is_not_served_and_frees_its_sessions(
    one_version, tmp_path, monkeypatch
):
    from tensorflow_serving.apis import prediction_log_pb2

    from charrnn_keras.serving import versions

    export_dir = tmp_path / "export"
    version = shutil.copytree(one_version, export_dir / MODEL / "1")
    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.CopyFrom(generate_request(**{names.PRIME: np.array([7], np.int32)}))
    with tf.io.TFRecordWriter(str(version / names.WARMUP_DIR / names.WARMUP_FILE)) as writer:
        writer.write(log.SerializeToString())
    made = []
    real = versions.LoadedVersion

    def recorded(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(versions, "LoadedVersion", recorded)
    # No heavy lane: its Sessions replay the warm-up inside LoadedVersion's own constructor.
    manager = versions.ModelManager(export_dir, MODEL, heavy_slots=0)
    try:
        spec = predict_pb2.PredictRequest().model_spec
        spec.name = MODEL
        (status,) = manager.status(spec)
        assert status.status.error_code != 0 and "prime" in status.status.error_message
        max_chars = made[0].signatures[names.METADATA].outputs[names.MAX_CHARS].name
        with pytest.raises(RuntimeError, match="closed Session"):
            made[0].session.run(max_chars)
    finally:
        manager.close()


def test_versions_that_do_not_fit_int64_are_ignored(one_version, tmp_path):
    """Issue 15, item 5: TF Serving skips folders that do not parse as an int64."""
    from charrnn_keras.serving.versions import ModelManager

    export_dir = tmp_path / "export"
    v1 = shutil.copytree(one_version, export_dir / MODEL / "1")
    huge = export_dir / MODEL / "99999999999999999999"
    _copy_version(v1, huge)
    assert names.list_versions(export_dir / MODEL) == [1]
    assert names.is_version_name(str(2**63 - 1)) and not names.is_version_name(str(2**63))
    manager = ModelManager(export_dir, MODEL)
    try:
        spec = predict_pb2.PredictRequest().model_spec
        spec.name = MODEL
        assert [s.version for s in manager.status(spec)] == [1]
        with manager.acquire(spec) as loaded:
            assert loaded.version == 1
    finally:
        manager.close()


# ----------------------------------------------------------------------------- long requests


def wait_until(condition, what: str, seconds: float = 60.0) -> None:
    """Waits for a condition the server reaches by itself (not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


ENDLESS = 900_000  # characters: minutes of work, under the export's 1,000,000 per request


@pytest.fixture(scope="module")
def long_export(tiny_run, tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("long-export")
    export_run(tiny_run, export_dir, MODEL, max_chars=ENDLESS)
    return export_dir


def test_long_generations_have_their_own_lane_and_stop_when_the_client_leaves(long_export):
    """Items 7 and 8: long requests run one at a time in the heavy lane and queue behind it;
    short ones are answered meanwhile; a full queue is RESOURCE_EXHAUSTED; a queued request
    whose client leaves never starts, and a running one is stopped (its Session closed)."""
    with start_server(long_export, MODEL, port=0, poll_seconds=3600, max_workers=4) as running:
        loaded = running.manager.current
        lane, outcomes = loaded.lane, running.manager.outcomes
        address = f"127.0.0.1:{running.port}"
        with grpc.insecure_channel(address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            endless = generate_request(num_chars=np.int32(ENDLESS))
            first = stub.Predict.future(endless)  # no deadline, as a killed client's
            wait_until(lambda: lane.running == 1, "the first long request runs")
            second = stub.Predict.future(endless)
            wait_until(lambda: lane.waiting == 1, "the second long request waits")
            assert _rpc_code(lambda: stub.Predict(endless, timeout=30)) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            over_cap = generate_request(num_chars=np.int32(ENDLESS + 1))  # refused, not queued
            assert _rpc_code(lambda: stub.Predict(over_cap, timeout=30)) == (
                grpc.StatusCode.INVALID_ARGUMENT
            )
            short = stub.Predict(generate_request(num_chars=np.int32(20)), timeout=30)
            assert len(short.outputs[names.TEXT].string_val[0]) == 20
            second.cancel()
            wait_until(lambda: outcomes.snapshot().get("dropped") == 1, "the queued one dropped")
            first.cancel()
            wait_until(lambda: outcomes.snapshot().get("cancelled") == 1, "the running one stops")
            wait_until(lambda: lane.running == 0, "the lane is free")
        with Client(address, MODEL) as client:
            assert len(client.generate("the", 5000)) == 5000  # heavy, on the reloaded Session
        counts = outcomes.snapshot()
        assert counts.get("refused") == 1 and counts.get("failed") == 1, counts  # over the cap


def test_a_request_whose_client_left_is_not_started(server):
    from charrnn_keras.serving.lanes import Call

    loaded, outcomes = server.manager.current, server.manager.outcomes
    before = outcomes.snapshot()
    call = Call()
    call.cancel()
    with pytest.raises(RequestError) as info:
        loaded.predict(generate_request(num_chars=np.int32(5)), call=call)
    assert info.value.code == grpc.StatusCode.CANCELLED
    after = outcomes.snapshot()
    assert after.get("dropped", 0) == before.get("dropped", 0) + 1
    assert after.get("completed") == before.get("completed")
