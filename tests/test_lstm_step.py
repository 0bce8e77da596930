"""The fused generation step and its loops: Keras's numbers, the same noise, the same text."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from test_export import random_run, run_generate

from charrnn_keras import cpu, draw, generation, lstm_step
from charrnn_keras import model as model_lib
from charrnn_keras.config import ModelConfig
from charrnn_keras.export import ExportModule
from charrnn_keras.serving import names
from charrnn_keras.vocab import Vocab

# (prime, num_chars, temperature, top_k, top_p, seed, strategy) rows: plain draws, greedy,
# top-k, top-p, words, long enough to cross the noise blocks (64 positions).
ROWS = [
    ("the cat", 150, 1.0, 0, 1.0, 3, "sample"),
    ("", 70, 0.5, 0, 1.0, 12, "sample"),
    ("sat on", 130, 1.3, 0, 1.0, -7, "sample"),
    ("the", 90, 0.0, 0, 1.0, 1, "sample"),
    ("the dog", 100, 0.8, 4, 1.0, 5, "sample"),
    ("a", 66, 1.0, 0, 0.7, 2**40, "sample"),
    ("the mat", 80, 1.0, 0, 1.0, 9, "words"),
]


def _model(fast_lstm: bool, layers: int = 2, vocab_size: int = 11):
    cfg = ModelConfig(embedding_dim=6, rnn_size=8, num_layers=layers, fast_lstm=fast_lstm)
    keras_model = model_lib.build_model(cfg, vocab_size, batch_size=1, seq_length=1)
    rng = np.random.default_rng(layers)
    keras_model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in
                             keras_model.get_weights()])  # fmt: skip
    return keras_model, Vocab(sorted("abcdefghij "))


@pytest.mark.parametrize("fast_lstm,layers", [(False, 2), (True, 2), (True, 3)])
def test_fused_step_is_the_keras_cells_step_exactly(fast_lstm, layers):
    # 13 characters: the layer-1 table is a 13-row matmul, which the step pads as it does a
    # batch (a 1-row tail of a 6-row block would round its last row another way on AVX2).
    model, vocab = _model(fast_lstm, layers, vocab_size=13)
    assert lstm_step.supported(model)
    cells = generation.Generator(model, vocab, fused=False)
    step = lstm_step.FusedStep(model)
    states = cells.zero_states(4)  # a padded row count: the cells' step runs the same rows
    fused_states = list(states)
    for ids in ([1, 2, 12, 3], [0, 5, 5, 11], [9, 3, 4, 7], [2, 2, 2, 2]):
        ids = tf.constant(ids, tf.int32)
        logits, states = cells.step(ids, states)
        got, fused_states = step(step.weights(), ids, fused_states)
        np.testing.assert_array_equal(got.numpy(), logits.numpy())
        for a, b in zip(fused_states, states, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    frozen = step.weights(frozen=True)
    # Matrices become numpy values (graph constants), biases stay tensors.
    assert [isinstance(w, np.ndarray) for w in frozen] == [w.ndim == 2 for w in frozen]
    expected = step(step.weights(), ids, fused_states)[0]
    np.testing.assert_array_equal(step(frozen, ids, fused_states)[0], expected)


@pytest.mark.parametrize("kernel", ["block", "matvec"])
def test_other_kernels_compute_the_same_lstm(kernel):
    """tf.raw_ops.LSTMBlockCell (gates i, c, f, o, no forget bias, no clipping) and one
    matrix-vector product per row are Keras's LSTM up to the products' rounding."""
    model, vocab = _model(True)
    cells = generation.Generator(model, vocab, fused=False)
    step = lstm_step.FusedStep(model, kernel=kernel)
    states = fused = cells.zero_states(2)
    for ids in ([1, 2], [7, 0], [3, 3]):
        logits, states = cells.step(tf.constant(ids), states)
        got, fused = step(step.weights(), tf.constant(ids), fused)
        np.testing.assert_allclose(got.numpy(), logits.numpy(), rtol=1e-5, atol=1e-5)


def test_only_the_matvec_kernel_feeds_and_draws_without_padding_rows(monkeypatch):
    def no_padding(*_):
        raise AssertionError("padded")

    monkeypatch.setattr(generation, "_pad_rows", no_padding)
    model, vocab = _model(True)
    ids, lengths = tf.constant([[1, 2, 3]]), tf.constant([3])
    flat, zeros = tf.ones([1]), tf.zeros([1], tf.int32)
    settings = generation.Draw(flat, zeros, flat, tf.constant([[1, 0]], tf.int64),
                               tf.zeros([1], tf.bool))  # fmt: skip
    matvec = generation.Generator(model, vocab, kernel="matvec")
    states = matvec.feed(ids, lengths, matvec.zero_states(1))
    drawn, _, _ = matvec.draw(ids[:, 0], states, tf.constant(5), settings, tf.constant(0, tf.int64))
    assert drawn.shape == (1, 5)
    matmul = generation.Generator(model, vocab, kernel="matmul")
    with pytest.raises(AssertionError, match="padded"):
        matmul.feed(ids, lengths, matmul.zero_states(1))


def test_auto_kernel_is_matvec_only_on_avx2_cpus_without_avx512():
    assert lstm_step.default_kernel("flags\t: fpu sse avx fma avx2\n") == "matvec"
    assert lstm_step.default_kernel("flags\t: fpu avx2 avx512f avx512_bf16\n") == "matmul"
    assert lstm_step.default_kernel("flags\t: fp asimd\n") == "matmul"  # another kind: unmeasured
    assert lstm_step.default_kernel("processor : 0\n") == "matmul"  # no flags line
    model, vocab = _model(True)
    assert generation.Generator(model, vocab).fused.kernel == lstm_step.default_kernel()
    with pytest.raises(ValueError, match="kernel must be one of .* got gemv"):
        lstm_step.FusedStep(model, kernel="gemv")


@pytest.mark.parametrize("units", [32, 256])
def test_matvec_step_is_the_1x1_models_own_numbers(units):
    """The oracle of tests/reference.py, the stateful 1x1 model called one character at a
    time: the matvec step is its logits bit for bit where it was measured (AVX2 without
    AVX-512, where the padded matmul rounds as a 4-row block and never matched). With 256
    units the step multiplies its 1 MiB matrices block by block (lstm_step._blockwise)."""
    cfg = ModelConfig(embedding_dim=8, rnn_size=units, num_layers=2)
    model = model_lib.build_model(cfg, 11, batch_size=1, seq_length=1)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) * 0.3 for w in
                       model.get_weights()])  # fmt: skip
    gen = generation.Generator(model, Vocab(sorted("abcdefghij ")), kernel="matvec")
    ranks = {w.shape.rank for w in gen.fused.weights()[1:-1:3]}  # the recurrent kernels
    assert ranks == ({4} if units == 256 else {2})
    model_lib.reset_states(model)
    states = gen.zero_states(1)
    ids = rng.integers(0, 11, 20)
    for char_id in ids:
        want = model(np.array([[char_id]], np.int32), training=False)[0, -1].numpy()
        got, states = gen.step(tf.constant([char_id], tf.int32), states)
        if cpu.avx2_only():
            np.testing.assert_array_equal(got.numpy()[0], want)
        else:
            np.testing.assert_allclose(got.numpy()[0], want, rtol=1e-5, atol=1e-5)
    # The feed loop reads layer 1 from the whole vocabulary's table: the same bits.
    fed = gen.feed(tf.constant([ids], tf.int32), tf.constant([len(ids)]), gen.zero_states(1))
    for a, b in zip(fed, states, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_other_models_keep_the_cells():
    cfg = ModelConfig(cell="gru", embedding_dim=4, rnn_size=8, num_layers=2)
    model = model_lib.build_model(cfg, 5, batch_size=1, seq_length=1)
    assert not lstm_step.supported(model)
    assert generation.Generator(model, Vocab(sorted("abcd "))).fused is None
    with pytest.raises(ValueError, match="kernel must be one of .* got gemv"):
        generation.Generator(model, Vocab(sorted("abcd ")), kernel="gemv")  # GRUs too


def test_noise_blocks_are_the_numbers_of_each_position():
    # Values of the per-position noise before blocks existed (commit a56f0f3's draw._gumbel).
    before = {
        0: [[0.1269509643316269, -0.007873301394283772, 1.0597646236419678, 1.4203321933746338],
            [-0.8806933760643005, 3.9918181896209717, 0.15304872393608093, 0.34186410903930664]],
        5: [[-0.1689305603504181, -0.5866520404815674, -0.7149373292922974, 0.0859303846955299],
            [-0.6666007041931152, 0.39014768600463867, -0.5477108359336853, -0.398411929607391]],
        130: [[1.6049563884735107, 0.7660013437271118, 1.6713379621505737, 0.3809273540973663],
              [1.470068097114563, -0.1154228150844574, 1.055597186088562, 0.4339942336082458]],
    }  # fmt: skip
    seeds = tf.constant([[7, 0], [-3, 2**40]], tf.int64)
    block = draw.gumbel_block(seeds, 0, 140, 2, 4).numpy()
    for position, values in before.items():
        np.testing.assert_array_equal(block[position], np.array(values, np.float32))
        alone = draw.gumbel_block(seeds, position, 1, 2, 4).numpy()[0]
        np.testing.assert_array_equal(alone, block[position])
    # One seed [2] for every row: each row is row 0's numbers.
    shared = draw.gumbel_block(tf.constant([7, 0], tf.int64), 120, 20, 2, 4).numpy()
    for row in range(2):
        np.testing.assert_array_equal(shared[:, row], block[120:140, 0])


def _export(run_dir, path, **options):
    model, cfg, vocab = generation.load_sampling_model(run_dir)
    ExportModule(model, cfg, vocab, **options).archive().write_out(str(path), verbose=False)
    return tf.saved_model.load(str(path)).signatures[names.GENERATE]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One random 2-layer LSTM run, exported with Keras's cells (the path before issue 14) and
    with the fused step's two kernels."""
    tmp = tmp_path_factory.mktemp("fused")
    text = "the cat sat on the mat. a dog ran."
    run_dir = random_run(tmp / "run", "lstm", text)
    kernels = [("cells", {"fused": False}), ("matmul", {"kernel": "matmul"}),
               ("matvec", {"kernel": "matvec"})]  # fmt: skip
    return run_dir, {name: _export(run_dir, tmp / name, **options) for name, options in kernels}


def test_fused_export_writes_the_cells_text_byte_for_byte(exports):
    _, fns = exports
    for fn_rows in (ROWS, ROWS[:3], ROWS[3:], [ROWS[0]] * 8):
        cols = [list(c) for c in zip(*fn_rows, strict=True)]
        prime, n, t, k, p, seed, strategy = cols
        texts = {name: run_generate(fn, prime, n, t, k, seed, p, strategy)
                 for name, fn in fns.items()}  # fmt: skip
        assert texts["matmul"] == texts["cells"]
        assert [len(x) for x in texts["matmul"]] == n
        # No near-tie in these draws, so the matvec kernel's other rounding writes the same.
        assert texts["matvec"] == texts["cells"]
    for row in ROWS:  # each row alone is its row of the batch
        prime, n, t, k, p, seed, strategy = row
        alone = {name: run_generate(fn, [prime], n, t, k, seed, p, strategy)
                 for name, fn in fns.items()}  # fmt: skip
        assert alone["matmul"] == alone["matvec"] == alone["cells"]


def test_bfloat16_export_loads_in_graph_mode_and_generates(exports, tmp_path):
    run_dir, _ = exports
    model, cfg, vocab = generation.load_sampling_model(run_dir)
    module = ExportModule(model, cfg, vocab, weights_dtype="bfloat16")
    module.archive().write_out(str(tmp_path / "bf16"), verbose=False)
    session = tf.compat.v1.Session(graph=tf.Graph())
    with session.graph.as_default():
        meta = tf.compat.v1.saved_model.loader.load(session, [names.SERVE_TAG],
                                                    str(tmp_path / "bf16"))  # fmt: skip
    sig = meta.signature_def[names.GENERATE]
    feeds = {names.PRIME: [b"the", b""], names.NUM_CHARS: [40, 70],
             names.TEMPERATURE: [1.0, 0.0], names.TOP_K: [0, 0], names.TOP_P: [1.0, 1.0],
             names.SEED: [[1, 0], [2, 0]], names.STRATEGY: [b"sample", b"sample"]}  # fmt: skip
    texts = session.run(sig.outputs[names.TEXT].name,
                        {sig.inputs[k].name: v for k, v in feeds.items()})  # fmt: skip
    assert [len(t.decode()) for t in texts] == [40, 70]
    assert set("".join(t.decode() for t in texts)) <= set(vocab.chars)
    session.close()


@pytest.mark.parametrize(("fused", "kernel"), [(True, "matmul"), (False, "matmul"),
                                               (True, "matvec")])  # fmt: skip
def test_a_row_alone_gets_the_bits_it_gets_in_a_batch(fused, kernel):
    # With 512 units oneDNN multiplies a one-row matrix another way (a matrix-vector product)
    # than a many-row one on AVX-512, and on AVX2 a block of 1-3 rows another way than one of
    # 4-6: without the Generator's padding rows (lstm_step.padded_rows) these differ in their
    # last bits, and at a near-tie a request alone would draw another character than in a
    # batch. 1, 3, 7 and 8 rows: every padding case. kernel="matvec" pads nothing: each row
    # is its own matrix-vector product.
    cfg = ModelConfig(embedding_dim=8, rnn_size=512, num_layers=2)
    model = model_lib.build_model(cfg, 11, batch_size=1, seq_length=1)
    gen = generation.Generator(model, Vocab(sorted("abcdefghij ")), fused=fused, kernel=kernel)
    rng = np.random.default_rng(0)
    ids = tf.constant(rng.integers(0, 11, size=(8, 4)), tf.int32)
    lengths = tf.constant([4, 3, 2, 4, 1, 4, 2, 3], tf.int32)
    seeds = tf.constant([[7 + b, 0] for b in range(8)], tf.int64)

    def run(rows):
        flat, zeros = tf.ones([rows]), tf.zeros([rows], tf.int32)
        settings = generation.Draw(flat, zeros, flat, seeds[:rows], tf.zeros([rows], tf.bool))
        states = gen.feed(ids[:rows], lengths[:rows], gen.zero_states(rows))
        drawn, last, states = gen.draw(ids[:rows, 0], states, tf.constant(20), settings,
                                       tf.constant(0, tf.int64))  # fmt: skip
        logits, _ = gen.step(last, states)
        return [drawn, logits, *states]

    alone = run(1)
    for rows in (3, 7, 8):
        for a, in_batch in zip(alone, run(rows), strict=True):
            np.testing.assert_array_equal(a.numpy(), in_batch.numpy()[:1], err_msg=str(rows))
