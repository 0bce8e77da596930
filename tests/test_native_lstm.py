"""oneDNN's fused LSTM op trains what keras.layers.LSTM computes, and only trains."""

from __future__ import annotations

import json
import platform
import shutil

import numpy as np
import pytest
import tensorflow as tf
from test_fast_lstm import _inputs, _pair, _run

from charrnn_keras import native_lstm
from charrnn_keras.config import load_config

# Where `make install` builds the op (it needs g++ and the onednn wheels, Linux x86-64 only),
# it must load: a suite that skipped every test here would hide a broken build.
BUILDABLE = platform.system() == "Linux" and platform.machine() == "x86_64" and shutil.which("g++")
needs_op = pytest.mark.skipif(not native_lstm.available(), reason="oneDNN LSTM op not built")


def test_the_op_is_built_where_it_can_be():
    if not BUILDABLE:
        pytest.skip("the op is built on Linux x86-64 with g++ only")
    assert native_lstm.available(), (
        "make install did not build the op: python -m charrnn_keras.native_lstm"
    )


@needs_op
@pytest.mark.parametrize("chains", [1, 2])
@pytest.mark.parametrize("graph", [False, True])
def test_training_outputs_states_and_gradients_match_keras(graph, chains, monkeypatch):
    monkeypatch.setattr(native_lstm, "op_chains", lambda: chains)  # 2: rows split 2 and 1
    ref, fast = _pair()
    fast.loop = "onednn"
    x, h0, c0 = _inputs()
    expected = _run(ref, x, h0, c0, graph, training=True)
    got = _run(fast, x, h0, c0, graph, training=True)
    for e, g in zip(expected[:3], got[:3], strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)
    names = ["dx", "dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias"]
    for name, e, g in zip(names, expected[3], got[3], strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


@needs_op
@pytest.mark.parametrize("chains", [1, 2])
def test_the_op_is_what_runs_in_training_and_only_there(chains, monkeypatch):
    monkeypatch.setattr(native_lstm, "op_chains", lambda: chains)
    _, fast = _pair()
    fast.loop = "onednn"
    x, h0, c0 = _inputs()

    def ops(training):
        graph = tf.function(lambda: fast(x, initial_state=[h0, c0], training=training))
        return [op.type for op in graph.get_concrete_function().graph.get_operations()]

    assert ops(training=True).count("CharrnnLstm") == chains  # one op per chain of rows
    assert not any(op.startswith("Charrnn") for op in ops(training=False))


def test_the_op_splits_the_batch_by_the_thread_pools():
    # One intra-op thread: one op per inter-op thread, at most one per core.
    assert native_lstm.op_chains(intra=1, inter=2, cores=2) == 2
    assert native_lstm.op_chains(intra=1, inter=4, cores=16) == 4
    assert native_lstm.op_chains(intra=1, inter=0, cores=2) == 2  # 0: one thread per core
    assert native_lstm.op_chains(intra=3, inter=16, cores=16) == 5
    # Every core in one op, or TensorFlow's default pools: one op, or two teams would share.
    assert native_lstm.op_chains(intra=2, inter=1, cores=2) == 1
    assert native_lstm.op_chains(intra=0, inter=0, cores=2) == 1


@needs_op
@pytest.mark.skipif(
    not native_lstm.runs_bfloat16(), reason="oneDNN's bf16 LSTM needs AVX-512, not on this CPU"
)
def test_bfloat16_kernels_stay_close_to_float32():
    ref, fast = _pair()
    fast.loop, fast.matmul_dtype = "onednn", "bfloat16"
    x, h0, c0 = _inputs()
    expected, got = _run(ref, x, h0, c0, training=True), _run(fast, x, h0, c0, training=True)
    assert got[0].dtype == tf.float32
    assert np.abs(got[0].numpy() - expected[0].numpy()).max() > 1e-5  # bf16 did run
    np.testing.assert_allclose(got[0].numpy(), expected[0].numpy(), atol=0.05)
    for e, g in zip(expected[3], got[3], strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=0.05 * np.abs(e.numpy()).max())


@needs_op
def test_bfloat16_goes_to_the_tensorflow_loop_where_onednn_has_no_kernels(monkeypatch):
    from charrnn_keras import model as model_lib
    from charrnn_keras.cpu import native_bf16
    from charrnn_keras.errors import ConfigError

    # Where "auto" picks bf16 (the CPU multiplies it natively), oneDNN's op must run it.
    assert native_lstm.runs_bfloat16() or not native_bf16()
    monkeypatch.setattr(native_lstm, "runs_bfloat16", lambda: False)  # an AVX2-only CPU
    bf16 = load_config(None, ["model.matmul_dtype=bfloat16"]).model
    assert model_lib.lstm_loop(bf16) == "tensorflow"
    assert model_lib.lstm_loop(load_config(None).model) == "onednn"  # float32 still does
    with pytest.raises(ConfigError, match="no bfloat16 kernels for this CPU .* set model.matmul"):
        model_lib.lstm_loop(load_config(None, ["model.matmul_dtype=bfloat16",
                                                "model.lstm_loop=onednn"]).model)  # fmt: skip
    ref, fast = _pair()
    fast.loop, fast.matmul_dtype = "auto", "bfloat16"
    x, h0, c0 = _inputs()
    graph = tf.function(lambda: fast(x, initial_state=[h0, c0], training=True))
    graph = graph.get_concrete_function().graph
    assert not any(op.type.startswith("Charrnn") for op in graph.get_operations())
    expected, got = _run(ref, x, h0, c0, training=True), _run(fast, x, h0, c0, training=True)
    assert np.abs(got[0].numpy() - expected[0].numpy()).max() > 1e-5  # bf16 did run
    np.testing.assert_allclose(got[0].numpy(), expected[0].numpy(), atol=0.05)


@needs_op
def test_the_op_refuses_mismatched_shapes():
    ops = native_lstm.load()
    x, h0, c0 = tf.zeros([2, 3, 4]), tf.zeros([2, 5]), tf.zeros([2, 5])
    u, b = tf.zeros([5, 20]), tf.zeros([20])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"kernel must be \[in, 4 \* units\]"):
        ops.charrnn_lstm(x, h0, c0, tf.zeros([3, 20]), u, b)
    with pytest.raises(tf.errors.InvalidArgumentError, match="h0 and c0 must be"):
        ops.charrnn_lstm(x, tf.zeros([1, 5]), c0, tf.zeros([4, 20]), u, b)


def test_a_library_built_for_another_tensorflow_is_not_loaded(tmp_path):
    library = tmp_path / "_lstm_op.so"
    assert native_lstm.load(library) is None  # not built
    library.write_bytes(b"not a library")  # a load attempt would fail loudly
    stamp = {**native_lstm._fingerprint(), "tensorflow": "2.0.0"}
    library.with_suffix(".json").write_text(json.dumps(stamp))
    assert native_lstm.load(library) is None


def test_build_without_onednn_headers_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(native_lstm, "_onednn_prefix", lambda: tmp_path)
    with pytest.raises(native_lstm.BuildError, match="pip install onednn-cpu-gomp"):
        native_lstm.build(tmp_path / "_lstm_op.so")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_failed_build_is_one_line_and_keeps_the_compiler_output(tmp_path, monkeypatch):
    source = tmp_path / "broken.cc"
    source.write_text("int main() { return undeclared_name; }\n")
    monkeypatch.setattr(native_lstm, "SOURCE", source)
    prefix = tmp_path / "onednn"  # headers present, so the compiler runs
    (prefix / "include" / "oneapi" / "dnnl").mkdir(parents=True)
    (prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp").touch()
    monkeypatch.setattr(native_lstm, "_onednn_prefix", lambda: prefix)
    library = tmp_path / "_lstm_op.so"
    with pytest.raises(native_lstm.BuildError) as caught:
        native_lstm.build(library)
    message = str(caught.value)
    assert "\n" not in message
    assert "undeclared_name" in message and str(library.with_suffix(".log")) in message
    assert "undeclared_name" in library.with_suffix(".log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_lstm_op.log", "broken.cc", "onednn"]


def test_loop_follows_the_config_and_what_is_built(monkeypatch):
    from charrnn_keras import model as model_lib
    from charrnn_keras.errors import ConfigError

    cfg = load_config(None).model
    monkeypatch.setattr(native_lstm, "available", lambda: False)
    assert model_lib.lstm_loop(cfg) == "tensorflow"
    with pytest.raises(ConfigError, match='model.lstm_loop = "onednn" needs the oneDNN LSTM op'):
        model_lib.lstm_loop(load_config(None, ["model.lstm_loop=onednn"]).model)
    monkeypatch.setattr(native_lstm, "available", lambda: True)
    assert model_lib.lstm_loop(cfg) == "onednn"
    monkeypatch.setattr(native_lstm, "op_chains", lambda: 2)  # what this process's pools give
    assert model_lib.compute_path(cfg) == {
        "layer": "FastLSTM", "matmul_dtype": "float32", "lstm_loop": "onednn", "chains": 2
    }  # fmt: skip
    assert model_lib.lstm_loop(load_config(None, ["model.lstm_loop=tensorflow"]).model) == (
        "tensorflow"
    )
    with pytest.raises(Exception, match="model.lstm_loop must be one of auto, onednn"):
        load_config(None, ["model.lstm_loop=cudnn"])
    with pytest.raises(Exception, match='needs model.cell = "lstm"'):
        load_config(None, ["model.cell=gru", "model.lstm_loop=onednn"])


def test_thread_pools_on_the_op_never_run_two_teams_on_the_same_cores(monkeypatch):
    from charrnn_keras.train import thread_pools

    monkeypatch.setattr(native_lstm, "available", lambda: True)
    monkeypatch.setattr(native_lstm, "runs_bfloat16", lambda: True)  # a CPU with AVX-512
    # 64 rows x 128 units (8M gate multiply-adds a step): one thread per op and one op per
    # core, in float32 and bf16 alike (the layer then splits its rows, op_chains).
    assert thread_pools(load_config(None), cores=2) == (1, 2)
    assert thread_pools(load_config(None, ["model.matmul_dtype=bfloat16"]), cores=2) == (1, 2)
    assert thread_pools(load_config(None, ["model.rnn_size=192"]), cores=2) == (1, 2)  # 19M
    # From 2 x 256 at 64 rows (34M): every core in the op, one op at a time.
    assert thread_pools(load_config(None, ["model.rnn_size=256"]), cores=2) == (2, 1)
    big = load_config(None, ["model.rnn_size=512", "model.matmul_dtype=bfloat16"])
    assert thread_pools(big, cores=2) == (2, 1)
    assert thread_pools(big, cores=16) == (16, 1)
    tiny = load_config(None, ["model.rnn_size=16", "data.batch_size=4"])
    assert thread_pools(tiny, cores=2) == (1, 2)
    pinned = load_config(None, ["model.rnn_size=512", "train.intra_op_threads=3"])
    assert thread_pools(pinned, cores=16) == (3, 1)
    # chains are a TensorFlow-loop setting: on the op they change nothing.
    chained = ["model.rnn_size=512", "model.matmul_dtype=bfloat16", "model.chains=2"]
    assert thread_pools(load_config(None, chained), cores=2) == (2, 1)


@needs_op
def test_a_run_trains_on_the_op_and_says_so(tiny_run):
    compute = json.loads((tiny_run / "run.json").read_text())["compute"]
    assert compute["lstm_loop"] == "onednn"
    # The ops each layer's batch was split into, as the recorded pools give them.
    pools = compute["intra_op_threads"], compute["inter_op_threads"]
    assert compute["chains"] == native_lstm.op_chains(*pools)


@needs_op
def test_sequences_too_long_to_unroll_still_train_on_the_op(monkeypatch):
    from charrnn_keras import fast_lstm

    monkeypatch.setattr(fast_lstm, "MAX_UNROLL", 3)  # the inputs have 5 steps
    ref, fast = _pair()
    fast.loop = "onednn"
    x, h0, c0 = _inputs()
    for training in (True, False):  # inference: Keras's loop, no unrolled graph
        expected = _run(ref, x, h0, c0, graph=True, training=training)
        got = _run(fast, x, h0, c0, graph=True, training=training)
        np.testing.assert_allclose(got[0].numpy(), expected[0].numpy(), rtol=1e-5, atol=1e-5)
        for e, g in zip(expected[3], got[3], strict=True):
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-5)


def test_models_that_do_not_train_never_load_the_op(monkeypatch):
    from charrnn_keras.model import build_model
    from charrnn_keras.sampling import Sampler
    from charrnn_keras.vocab import Vocab

    def refuse(*args, **kwargs):
        raise AssertionError("the op was looked for")

    monkeypatch.setattr(native_lstm, "load", refuse)
    cfg = load_config(None, ["model.lstm_loop=onednn"]).model
    sampler = Sampler(cfg, Vocab("abc"))
    assert sampler.sample("a", 5, seed=1)
    model = build_model(cfg, 5, 2, 4)  # a training-shaped model, used for inference only
    model(np.zeros((2, 4), "int32"))
