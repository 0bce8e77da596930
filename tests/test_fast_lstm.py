"""FastLSTM computes what keras.layers.LSTM computes: outputs, states and gradients."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from charrnn_keras.fast_lstm import FastLSTM

BATCH, STEPS, FEATURES, UNITS = 3, 5, 4, 6


def _pair(**kwargs):
    """Returns (keras LSTM, FastLSTM) built with identical random weights."""
    ref = keras.layers.LSTM(UNITS, return_sequences=True, return_state=True, **kwargs)
    fast = FastLSTM(UNITS, return_sequences=True, return_state=True, **kwargs)
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
    layer = FastLSTM(UNITS, matmul_dtype="bfloat16", chains=2, time_chunks=4, name="lstm_1")
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(clone, FastLSTM)
    assert (clone.matmul_dtype, clone.chains, clone.time_chunks) == ("bfloat16", 2, 4)
