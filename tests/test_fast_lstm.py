"""FastLSTM computes what keras.layers.LSTM computes: outputs, states and gradients."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from charrnn_keras.fast_lstm import FastLSTM

BATCH, STEPS, FEATURES, UNITS = 3, 5, 4, 6


def _pair(**kwargs):
    """Returns (keras LSTM, FastLSTM on TensorFlow ops) built with identical random weights."""
    ref = keras.layers.LSTM(UNITS, return_sequences=True, return_state=True, **kwargs)
    fast = FastLSTM(UNITS, return_sequences=True, return_state=True, loop="tensorflow", **kwargs)
    ref.build((BATCH, STEPS, FEATURES))
    fast.build((BATCH, STEPS, FEATURES))
    rng = np.random.default_rng(0)
    weights = [rng.normal(0, 0.5, w.shape).astype("float32") for w in ref.get_weights()]
    ref.set_weights(weights)
    fast.set_weights(weights)
    return ref, fast


def _inputs(seed=1):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(BATCH, STEPS, FEATURES)).astype("float32"))
    h0 = tf.constant(rng.normal(size=(BATCH, UNITS)).astype("float32"))
    c0 = tf.constant(rng.normal(size=(BATCH, UNITS)).astype("float32"))
    return x, h0, c0


def _run(layer, x, h0, c0, graph=False, training=False):
    """Returns (outputs, h, c, grads) for a scalar loss of every output, in eager or graph mode."""
    upstream = tf.constant(np.random.default_rng(2).normal(size=(BATCH, STEPS, UNITS)), "float32")

    def f(x, h0, c0):
        with tf.GradientTape() as tape:
            tape.watch([x, h0, c0])
            out, h, c = layer(x, initial_state=[h0, c0], training=training)
            loss = tf.reduce_sum(out * upstream) + tf.reduce_sum(h) + 2 * tf.reduce_sum(c)
        variables = [v.value for v in layer.trainable_variables]
        grads = tape.gradient(loss, [x, h0, c0, *variables])
        return out, h, c, grads

    if graph:
        f = tf.function(f)
    return f(x, h0, c0)


def test_same_weight_names_and_shapes():
    ref, fast = _pair()
    assert [(w.path.split("/", 1)[1], w.shape) for w in ref.weights] == [
        (w.path.split("/", 1)[1], w.shape) for w in fast.weights
    ]
    assert fast.fast_path_ok(tf.zeros((BATCH, STEPS, FEATURES)), None)


@pytest.mark.parametrize("graph", [False, True])
def test_outputs_states_and_gradients_match_keras(graph):
    ref, fast = _pair()
    x, h0, c0 = _inputs()
    expected = _run(ref, x, h0, c0, graph)
    got = _run(fast, x, h0, c0, graph)
    for e, g in zip(expected[:3], got[:3], strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)
    names = ["dx", "dh0", "dc0", "dkernel", "drecurrent_kernel", "dbias"]
    for name, e, g in zip(names, expected[3], got[3], strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_bfloat16_matmuls_stay_close_and_only_in_training():
    ref, fast = _pair()
    fast.matmul_dtype = "bfloat16"
    x, h0, c0 = _inputs()
    inference = _run(fast, x, h0, c0)
    np.testing.assert_allclose(inference[0].numpy(), _run(ref, x, h0, c0)[0].numpy(), atol=1e-5)
    expected, got = _run(ref, x, h0, c0, training=True), _run(fast, x, h0, c0, training=True)
    assert got[0].dtype == tf.float32
    assert np.abs(got[0].numpy() - expected[0].numpy()).max() > 1e-5  # bf16 did run
    np.testing.assert_allclose(got[0].numpy(), expected[0].numpy(), atol=0.05)
    for e, g in zip(expected[3], got[3], strict=True):
        scale = np.abs(e.numpy()).max()
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=0.05 * scale)


def test_stateful_model_and_cell_step_share_weights():
    """In a stateful Sequential the layer carries state like Keras's; its cell runs one step."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 7, size=(2, BATCH, STEPS)).astype("int32")

    def model(layer_cls):
        keras.utils.set_random_seed(4)
        return keras.Sequential(
            [
                keras.Input(batch_shape=(BATCH, STEPS), dtype="int32"),
                keras.layers.Embedding(7, FEATURES, name="embedding"),
                layer_cls(UNITS, stateful=True, return_sequences=True, name="lstm_1"),
            ]
        )

    ref, fast = model(keras.layers.LSTM), model(FastLSTM)
    fast.set_weights(ref.get_weights())
    for batch in ids:  # the second batch starts from the state the first one left
        np.testing.assert_allclose(fast(batch).numpy(), ref(batch).numpy(), atol=1e-5)
    layer = fast.get_layer("lstm_1")
    x = tf.constant(rng.normal(size=(BATCH, FEATURES)), "float32")
    states = [tf.zeros((BATCH, UNITS)), tf.zeros((BATCH, UNITS))]
    h, _ = layer.cell(x, states)
    np.testing.assert_allclose(h.numpy(), ref.get_layer("lstm_1").cell(x, states)[0].numpy())


def test_unsupported_settings_fall_back_to_keras():
    ref, fast = _pair(go_backwards=True)
    assert not fast.fast_path_ok(tf.zeros((BATCH, STEPS, FEATURES)), None)
    assert not _pair()[1].fast_path_ok(tf.zeros((BATCH, 1, FEATURES)), None)  # sampling
    x, h0, c0 = _inputs()
    np.testing.assert_allclose(
        _run(fast, x, h0, c0)[0].numpy(), _run(ref, x, h0, c0)[0].numpy(), atol=1e-6
    )


@pytest.mark.parametrize("chains, time_chunks", [(2, 1), (1, 2), (2, 3)])
def test_chains_and_time_chunks_give_the_same_results(chains, time_chunks):
    ref, fast = _pair()
    fast.chains = chains  # e.g. rows 0-1 and row 2 run as separate recurrences
    fast.time_chunks = time_chunks  # e.g. steps 0-1 and 2-4 projected in separate matmuls
    x, h0, c0 = _inputs()
    expected, got = _run(ref, x, h0, c0, graph=True), _run(fast, x, h0, c0, graph=True)
    np.testing.assert_allclose(got[0].numpy(), expected[0].numpy(), rtol=1e-5, atol=1e-5)
    for e, g in zip(expected[3], got[3], strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-5)


def test_config_round_trip():
    layer = FastLSTM(UNITS, matmul_dtype="bfloat16", chains=2, time_chunks=4, loop="tensorflow",
                     name="lstm_1")  # fmt: skip
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(clone, FastLSTM)
    assert (clone.matmul_dtype, clone.chains, clone.time_chunks, clone.loop) == (
        "bfloat16", 2, 4, "tensorflow"
    )  # fmt: skip
    with pytest.raises(ValueError, match="loop must be one of auto, onednn, tensorflow, got 'x'"):
        FastLSTM(UNITS, loop="x")


# --- FastLSTM in the package: config keys, weights shared with keras.layers.LSTM, training ---


def _package_models(fast_overrides, batch=4, seq=6, vocab=11):
    """Returns (keras-LSTM model, FastLSTM model) of the tiny config with the same weights."""
    from conftest import TINY_CONFIG

    from charrnn_keras.config import load_config
    from charrnn_keras.model import build_model

    plain = build_model(
        load_config(TINY_CONFIG, ["model.fast_lstm=false"]).model, vocab, batch, seq
    )
    fast = build_model(load_config(TINY_CONFIG, fast_overrides).model, vocab, batch, seq)
    fast.set_weights(plain.get_weights())
    return plain, fast


def test_config_builds_fast_lstm_layers_with_its_settings():
    from charrnn_keras.model import rnn_layers

    overrides = ["model.fast_lstm=true", "model.matmul_dtype=bfloat16", "model.chains=2",
                 "model.time_chunks=3"]  # fmt: skip
    plain, fast = _package_models(overrides)
    assert [type(layer) for layer in rnn_layers(plain)] == [keras.layers.LSTM] * 2
    layers = rnn_layers(fast)
    assert [type(layer) for layer in layers] == [FastLSTM] * 2
    assert {(la.matmul_dtype, la.chains, la.time_chunks) for la in layers} == {("bfloat16", 2, 3)}
    assert [layer.name for layer in fast.layers] == [layer.name for layer in plain.layers]


def test_fast_model_infers_what_the_keras_model_does(tmp_path):
    plain, fast = _package_models(["model.fast_lstm=true", "model.chains=2", "model.time_chunks=2"])
    x = np.random.default_rng(0).integers(0, 11, (4, 6)).astype("int32")
    np.testing.assert_allclose(fast(x), plain(x), atol=1e-5)
    # A weights file from the fast model loads into the plain one, as the sampler does.
    fast.save_weights(tmp_path / "fast.weights.h5")
    plain.load_weights(tmp_path / "fast.weights.h5")
    np.testing.assert_allclose(plain(x), fast(x), atol=1e-5)


def test_fast_bf16_run_trains_and_its_checkpoints_serve_plain_lstm(tmp_path):
    from conftest import TINY_CONFIG, TINY_TEXT

    from charrnn_keras import checkpoints, rundir
    from charrnn_keras import corpus as corpus_lib
    from charrnn_keras.config import load_config
    from charrnn_keras.errors import CharRNNError
    from charrnn_keras.resume import check_resume
    from charrnn_keras.sampling import Sampler
    from charrnn_keras.train import train

    data = tmp_path / "corpus.txt"
    data.write_text(TINY_TEXT, encoding="utf-8")
    fast = ["model.fast_lstm=true", "model.matmul_dtype=bfloat16", "model.chains=2",
            "model.time_chunks=2", "train.sample_chars=0", "train.epochs=3"]  # fmt: skip
    run = tmp_path / "run"
    result = train(load_config(TINY_CONFIG, fast), str(data), run, verbose=0)
    assert result.best_val_loss < np.log(len(set(TINY_TEXT))) - 0.5

    # A sampler with keras.layers.LSTM loads the FastLSTM run's checkpoint and writes the same.
    cfg, vocab = rundir.load_run(run)
    plain = Sampler(load_config(TINY_CONFIG).model, vocab)
    checkpoints.load_weights(plain.model, checkpoints.find_checkpoint(run))
    expected = Sampler.from_run_dir(run).sample("the ", 40, seed=3)
    assert plain.sample("the ", 40, seed=3) == expected

    # Resuming may switch the speed settings (same weights), not the model.
    corpus = corpus_lib.load_corpus(str(data), cfg.data.max_chars, cache_dir=None)
    check_resume(run, load_config(TINY_CONFIG, ["train.epochs=3"]), corpus)
    with pytest.raises(CharRNNError, match="model.rnn_size"):
        check_resume(run, load_config(TINY_CONFIG, [*fast, "model.rnn_size=8"]), corpus)


def test_thread_settings_apply_before_tensorflow_starts():
    import subprocess
    import sys

    code = (
        "import tensorflow as tf\n"
        "from charrnn_keras.config import Config, TrainConfig\n"
        "from charrnn_keras.train import apply_threads\n"
        "apply_threads(Config(train=TrainConfig(intra_op_threads=1, inter_op_threads=3)))\n"
        "tf.constant(1.0) + 1\n"
        "print(tf.config.threading.get_intra_op_parallelism_threads(),"
        " tf.config.threading.get_inter_op_parallelism_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "3"]


def test_thread_settings_after_tensorflow_started_warn(caplog):
    from charrnn_keras.config import Config, TrainConfig
    from charrnn_keras.train import apply_threads

    tf.constant(1.0) + 1  # the pools are fixed from here on
    wanted = tf.config.threading.get_inter_op_parallelism_threads() + 5
    with caplog.at_level("WARNING"):
        apply_threads(Config(train=TrainConfig(inter_op_threads=wanted)))
    assert f"TF_NUM_INTEROP_THREADS={wanted}" in caplog.text


def test_defaults_train_lstm_layers_with_fast_lstm_and_say_so():
    from charrnn_keras.config import load_config
    from charrnn_keras.model import build_model, compute_path

    cfg = load_config(None)
    layers = build_model(cfg.model, 5, 2, 4).layers
    assert any(isinstance(layer, FastLSTM) for layer in layers)
    cfg = load_config(None, ["model.lstm_loop=tensorflow"])
    assert compute_path(cfg.model) == {"layer": "FastLSTM", "matmul_dtype": "float32",
                                       "chains": 1, "time_chunks": 1,
                                       "lstm_loop": "tensorflow"}  # fmt: skip
    # GRU and SimpleRNN configs are untouched by the default; FastLSTM-only keys are refused.
    gru = load_config(None, ["model.cell=gru"])
    assert compute_path(gru.model) == {"layer": "keras.layers.GRU", "matmul_dtype": "float32"}
    with pytest.raises(Exception, match='needs model.cell = "lstm" and model.fast_lstm = true'):
        load_config(None, ["model.cell=gru", "model.chains=2"])


def test_auto_matmul_dtype_is_bf16_only_on_cpus_that_multiply_it_natively(monkeypatch):
    from charrnn_keras import model as model_lib
    from charrnn_keras.config import ModelConfig
    from charrnn_keras.cpu import native_bf16

    assert native_bf16("flags\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert native_bf16("flags\t: fpu amx_bf16\n")
    assert not native_bf16("flags\t: fpu sse avx2 avx512f\n")
    assert not native_bf16("processor : 0\n")  # no flags line (another OS's format)
    cfg = ModelConfig(matmul_dtype="auto")
    for native, dtype in [(True, "bfloat16"), (False, "float32")]:
        monkeypatch.setattr(model_lib, "native_bf16", lambda native=native: native)
        assert model_lib.matmul_dtype(cfg) == dtype
        assert model_lib.compute_path(cfg)["matmul_dtype"] == dtype


def test_thread_pools_come_from_the_core_count_for_chains():
    from charrnn_keras.config import load_config
    from charrnn_keras.train import thread_pools

    tf_loop = "model.lstm_loop=tensorflow"  # the op's pools: test_native_lstm.py
    assert thread_pools(load_config(None, [tf_loop])) == (0, 0)  # TensorFlow's: one per core
    chained = load_config(None, [tf_loop, "model.chains=2"])
    assert thread_pools(chained, cores=2) == (1, 2)
    assert thread_pools(chained, cores=16) == (8, 2)
    pinned = load_config(None, [tf_loop, "model.chains=2", "train.intra_op_threads=3"])
    assert thread_pools(pinned, cores=16) == (3, 2)
