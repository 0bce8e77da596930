"""The sampling model and the draw loop: state, reproducibility, temperature, top-k, primes, CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from reference import reference_generate

from charrnn_keras import cli, rundir
from charrnn_keras.config import Config, ModelConfig
from charrnn_keras.errors import CharRNNError
from charrnn_keras.model import build_model, reset_states
from charrnn_keras.sampling import CHUNK, FIRST_CHUNK, Sampler
from charrnn_keras.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]
TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n"
VOCAB = Vocab.from_codepoints(np.array([ord(c) for c in TEXT]))[0]
CFG = ModelConfig(embedding_dim=8, rnn_size=16, num_layers=2)


@pytest.fixture(scope="module")
def sampler() -> Sampler:
    keras.utils.set_random_seed(3)
    s = Sampler(CFG, VOCAB)
    # Larger weights than the initialiser's: sharper logits that depend more on the state.
    s.model.set_weights([3.0 * w for w in s.model.get_weights()])
    return s


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory, sampler):
    """A run directory written by hand (no training), holding ``sampler``'s weights."""
    run = tmp_path_factory.mktemp("hand") / "run"
    (run / rundir.CHECKPOINT_DIR).mkdir(parents=True)
    (run / rundir.CONFIG_FILE).write_text(Config(model=CFG).to_toml(), encoding="utf-8")
    VOCAB.save(run / "vocab.json")
    training = build_model(CFG, len(VOCAB), batch_size=4, seq_length=8)
    training.set_weights(sampler.model.get_weights())
    training.save_weights(run / rundir.CHECKPOINT_DIR / rundir.BEST)
    return run


def controlled(vocab: Vocab, bias) -> Sampler:
    """A sampler whose logits are ``bias`` whatever the input (zero Dense kernel)."""
    s = Sampler(ModelConfig(embedding_dim=4, rnn_size=8, num_layers=1), vocab)
    dense = s.model.get_layer("logits")
    kernel, _ = dense.get_weights()
    dense.set_weights([np.zeros_like(kernel), np.asarray(bias, np.float32)])
    return s


def reference(sampler, prime, num_chars, **settings):
    """The oracle (tests/reference.py) on a separate model holding the sampler's weights."""
    model = build_model(sampler.cfg, len(sampler.vocab), batch_size=1, seq_length=1)
    model.set_weights(sampler.model.get_weights())
    return reference_generate(model, sampler.vocab, prime, num_chars, **settings)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_sampling_model_logits_equal_training_model_logits(cell):
    keras.utils.set_random_seed(5)
    cfg = ModelConfig(cell=cell, embedding_dim=8, rnn_size=16, num_layers=2, dropout=0.2)
    training = build_model(cfg, len(VOCAB), batch_size=2, seq_length=8)
    s = Sampler(cfg, VOCAB)
    s.set_weights_from(training)
    ids = VOCAB.encode(TEXT[:16])
    other = VOCAB.encode(TEXT[16:32])
    # Two consecutive batches: the training model's state must carry over like the sampler's.
    expected = np.concatenate(
        [training(np.stack([ids[k : k + 8], other[k : k + 8]]), training=False)[0] for k in (0, 8)]
    )
    reset_states(s.model)
    got = np.concatenate([s.model(np.array([[i]]), training=False)[0] for i in ids])
    assert got.shape == (16, len(VOCAB))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 1.0},
        {"temperature": 0.7, "top_k": 5},
        {"temperature": 2.0, "strategy": "words"},
    ],
    ids=["sample", "top_k", "words"],
)
def test_generate_matches_the_naive_stateful_loop(sampler, settings):
    got = sampler.sample("the cat ", 40, seed=9, **settings)
    assert got == reference(sampler, "the cat ", 40, seed=9, **settings)


def test_chunk_boundaries_do_not_change_the_text(sampler):
    n = FIRST_CHUNK + CHUNK + 5  # three compiled calls, the state carried between them
    got = sampler.sample("the cat ", n, seed=4, strategy="words", temperature=1.5)
    assert got == reference(sampler, "the cat ", n, seed=4, strategy="words", temperature=1.5)


def test_same_seed_same_text_twice(sampler):
    first = sampler.sample("the ", 60, temperature=1.0, seed=123)
    assert len(first) == 60
    sampler.sample("on the log.\n", 30, seed=1)  # leaves another state behind
    assert sampler.sample("the ", 60, temperature=1.0, seed=123) == first
    assert sampler.sample("the ", 60, temperature=1.0, seed=124) != first


def test_same_seed_same_text_in_another_process(sampler, hand_run):
    expected = sampler.sample("the ", 50, temperature=0.9, seed=77)
    args = ["--run-dir", str(hand_run), "-p", "the ", "-n", "50", "-t", "0.9", "--seed", "77"]
    env = dict(os.environ, PYTHONIOENCODING="utf-8", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-m", "charrnn_keras.cli", "sample", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "the " + expected + "\n"


def test_temperature_zero_is_argmax_at_every_step(sampler):
    text = sampler.sample("the d", 30, temperature=0, seed=1)
    assert sampler.sample("the d", 30, temperature=0, seed=2) == text  # no randomness left
    reset_states(sampler.model)
    fed = VOCAB.encode("the d" + text)
    for n, i in enumerate(fed[:-1]):
        logits = sampler.model(np.array([[i]]), training=False)[0, -1]
        if n >= 4:  # from the last prime character on, each output is the next input
            assert VOCAB.chars[int(np.argmax(logits))] == text[n - 4]


def test_top_k_never_draws_outside_the_k_most_likely():
    vocab = Vocab("abcdefghij")
    bias = [0.3, 0.9, 0.1, 0.5, 0.8, 0.0, 0.2, 0.7, 0.4, 0.6]  # top 3: b, e, h
    s = controlled(vocab, bias)
    assert set(s.sample("a", 200, temperature=20.0, top_k=3, seed=4)) == {"b", "e", "h"}
    assert set(s.sample("a", 200, temperature=20.0, top_k=1, seed=4)) == {"b"}
    assert len(set(s.sample("a", 200, temperature=20.0, top_k=0, seed=4))) > 3


def test_words_strategy_draws_only_at_the_start_of_a_word():
    vocab = Vocab(" abcd")
    s = controlled(vocab, [1.0, 0.9, 0.8, 0.7, 0.6])  # argmax is always the space
    words = s.sample("a", 200, temperature=20.0, strategy="words", seed=2)
    assert words[0] == " "  # the prime ends inside a word
    assert all(c == " " for prev, c in zip(words, words[1:], strict=False) if prev != " ")
    assert set(words) == set(" abcd")  # it did draw after spaces
    plain = s.sample("a", 200, temperature=20.0, strategy="sample", seed=2)
    assert any(c != " " for prev, c in zip(plain, plain[1:], strict=False) if prev != " ")


def test_unknown_characters_error_names_them(sampler):
    with pytest.raises(CharRNNError) as e:
        sampler.prepare_prime("thé cat\tsat")
    message = str(e.value)
    assert "'é' (U+00E9)" in message and "'\\t' (U+0009)" in message
    assert "unknown='skip'" in message and "\n" not in message
    assert "--unknown skip" in e.value.render(cli.flag)
    with pytest.raises(CharRNNError, match="U\\+00E9"):
        sampler.generate("thé", 5)


def test_unknown_skip_drops_them(sampler):
    assert sampler.prepare_prime("thé cat\tsat", unknown="skip") == "th catsat"
    assert sampler.prepare_prime("éé", unknown="skip") == "\n"
    assert sampler.prepare_prime("the cat", unknown="skip") == "the cat"
    with pytest.raises(CharRNNError, match="'drop'"):
        sampler.prepare_prime("the", unknown="drop")


def test_empty_prime_starts_from_newline_else_most_frequent(sampler):
    assert sampler.prepare_prime("") == "\n"
    no_newline = Vocab(" abt", counts=[5, 2, 9, 1])
    assert controlled(no_newline, [0, 0, 0, 0]).prepare_prime("") == "b"
    assert len(sampler.sample("", 10, seed=1)) == 10


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"num_chars": -1}, "-1"),
        ({"temperature": -0.5}, "-0.5"),
        ({"temperature": float("nan")}, "nan"),
        ({"temperature": float("inf")}, "inf"),
        ({"top_k": -1}, "-1"),
        ({"top_k": len(VOCAB) + 1}, str(len(VOCAB) + 1)),
        ({"strategy": "beam"}, "'beam'"),
        ({"seed": 2**64}, str(2**64)),
    ],
)
def test_bad_settings_raise_one_line_naming_the_value(sampler, kwargs, shown):
    args = {"num_chars": 5, **kwargs}
    with pytest.raises(CharRNNError) as e:
        sampler.generate("the", **args)  # raises at the call, before any iteration
    assert shown in str(e.value) and "\n" not in str(e.value)


def test_generate_streams_and_compiles_once(sampler):
    chars = sampler.generate("the ", 5, seed=1)
    assert next(chars) in VOCAB.chars  # an iterator: characters come one at a time
    assert len(list(chars)) == 4
    sampler.sample("a", 3, temperature=0.5, top_k=2, strategy="words", seed=-8)
    sampler.sample("the long dog", 3, temperature=0)
    assert sampler.trace_count() == 2  # the feed and the draw, each traced once


def test_a_new_generation_stops_an_unfinished_one(sampler):
    old = sampler.generate("the ", 10, seed=1)
    next(old)
    assert len(sampler.sample("a", 3)) == 3
    with pytest.raises(RuntimeError, match="reset"):
        next(old)


def test_from_run_dir_loads_the_best_checkpoint(sampler, hand_run):
    loaded = Sampler.from_run_dir(hand_run)
    assert loaded.sample("the ", 30, seed=5) == sampler.sample("the ", 30, seed=5)
    with pytest.raises(CharRNNError, match="does not exist"):
        Sampler.from_run_dir(hand_run, checkpoint="nope.weights.h5")


def test_kernel_flag_reaches_the_sampler(sampler, hand_run, monkeypatch, capsys):
    expected = reference(sampler, "the ", 30, seed=5)
    for kernel in ("matmul", "matvec"):
        loaded = Sampler.from_run_dir(hand_run, kernel=kernel)
        assert loaded.generator.fused.kernel == kernel
        assert loaded.sample("the ", 30, seed=5) == expected
    chosen = []
    from_run_dir = Sampler.from_run_dir.__func__

    def spy(cls, run_dir, checkpoint=None, kernel="auto"):
        chosen.append(kernel)
        return from_run_dir(cls, run_dir, checkpoint, kernel)

    monkeypatch.setattr(Sampler, "from_run_dir", classmethod(spy))
    argv = ["sample", "--run-dir", str(hand_run), "-p", "the ", "-n", "30", "--seed", "5"]
    assert cli.main(argv) == 0 and cli.main([*argv, "--kernel", "matmul"]) == 0
    assert chosen == ["auto", "matmul"]
    assert capsys.readouterr().out == 2 * ("the " + expected + "\n")


@pytest.mark.slow
def test_cli_sample_end_to_end(tiny_run, capsys):
    argv = ["sample", "--run-dir", str(tiny_run), "-p", "the ", "-n", "40", "--seed", "3"]
    assert cli.main([*argv, "-t", "0.5", "--top-k", "4", "--strategy", "words"]) == 0
    out = capsys.readouterr().out
    expected = Sampler.from_run_dir(tiny_run).sample(
        "the ", 40, temperature=0.5, top_k=4, strategy="words", seed=3
    )
    assert out == "the " + expected + "\n"
    assert cli.main([*argv[:3], "-p", "thé ", "-n", "5"]) == 2
    err = capsys.readouterr()
    assert err.out == "" and "'é' (U+00E9)" in err.err and len(err.err.splitlines()) == 1
    assert cli.main([*argv[:3], "-p", "thé ", "-n", "5", "--unknown", "skip"]) == 0
    assert capsys.readouterr().out.startswith("th ")
    assert cli.main([*argv, "-t", "-1"]) == 2
    err = capsys.readouterr()
    assert err.out == "" and "got -1.0" in err.err


def test_top_p_draws_only_from_the_nucleus():
    vocab = Vocab("abcdefghij")
    bias = np.array([0.3, 2.9, 0.1, 0.5, 2.0, 0.0, 0.2, 1.7, 0.4, 0.6], np.float32)
    s = controlled(vocab, bias)
    probs = np.exp(bias) / np.exp(bias).sum()
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]  # KerasHub's TopPSampler keeps these
    for p in (0.3, 0.6, 0.9):
        nucleus = {vocab.chars[i] for i, b in zip(order, before, strict=True) if b <= p}
        drawn = set(s.sample("a", 300, top_p=p, seed=5))
        assert drawn == nucleus, (p, drawn, nucleus)
    assert len(set(s.sample("a", 300, top_p=1.0, seed=5))) == len(vocab)
    assert s.sample("a", 50, top_p=0.0, seed=5) == s.sample("a", 50, temperature=0, seed=6)
    # Temperature first: a hot distribution spreads the mass, so the nucleus grows.
    assert len(set(s.sample("a", 300, top_p=0.6, temperature=5.0, seed=5))) > 3


def test_samples_are_each_their_seed_alone(sampler):
    settings = {"temperature": 1.3, "top_k": 6, "top_p": 0.9}
    many = sampler.samples("the ", 45, 4, seed=20, **settings)
    assert many == [sampler.sample("the ", 45, seed=20 + i, **settings) for i in range(4)]
    assert len(set(many)) == 4
    assert sampler.samples("the ", 5, 1, seed=3) == [sampler.sample("the ", 5, seed=3)]
    with pytest.raises(CharRNNError, match="num_samples"):
        sampler.samples("the ", 5, 0)
    with pytest.raises(CharRNNError, match=r"top_p must be a number from 0 to 1 .*, got 1.5"):
        sampler.samples("the ", 5, 2, top_p=1.5)


@pytest.mark.slow
def test_cli_num_samples_and_top_p(hand_run, sampler, capsys):
    argv = ["sample", "--run-dir", str(hand_run), "-p", "the ", "-n", "30", "--seed", "8"]
    assert cli.main([*argv, "--top-p", "0.7", "--num-samples", "3"]) == 0
    out = capsys.readouterr().out
    texts = [sampler.sample("the ", 30, seed=8 + i, top_p=0.7) for i in range(3)]
    expected = "".join(
        f"--- sample {i + 1} (--seed {8 + i})\nthe {t}\n" for i, t in enumerate(texts)
    )
    assert out == expected


def test_epoch_samples_change_seed_with_the_epoch(sampler, caplog):
    from charrnn_keras.callbacks import SampleText

    callback = SampleText(sampler, 30, seed=5, temperature=1.0)
    callback.set_model(sampler.model)  # same layers: the sampler copies its own weights
    with caplog.at_level(logging.INFO, logger="charrnn_keras.callbacks"):
        for epoch in range(3):
            callback.on_epoch_end(epoch, {"loss": 1.0})
    logged = [
        r.getMessage().split("\n", 1)[1] for r in caplog.records if "sample after" in r.getMessage()
    ]
    # With the weights unchanged, only the seed makes the epochs' samples differ.
    assert logged == [sampler.sample("", 30, temperature=1.0, seed=5 + e) for e in range(3)]
    assert len(set(logged)) == 3


def test_draws_follow_the_softmax_and_rows_are_their_seed_alone():
    from charrnn_keras.draw import draw_next

    logits = tf.constant([[2.0, 1.0, 0.0, -1.0, 0.5]])
    probs = tf.nn.softmax(logits)[0].numpy()
    n = 4000  # rows of one call, each its own seed: as independent as positions of one seed
    seeds = tf.stack([tf.range(n, dtype=tf.int64), tf.zeros([n], tf.int64)], axis=1)
    drawn = draw_next(tf.tile(logits, [n, 1]), [1.0] * n, 0, seeds, 3).numpy()
    freq = np.bincount(drawn, minlength=5) / n
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) < 4 * sigma), (freq, probs)
    # One seed per row: each row is drawn as it would be alone, whatever its neighbours.
    rows = tf.tile(logits, [3, 1])
    seeds = tf.constant([[1, 0], [2, 0], [1, 5]], tf.int64)
    together = draw_next(rows, [1.0, 1.0, 1.0], 0, seeds, 9).numpy()
    alone = [int(draw_next(logits, 1.0, 0, seeds[i], 9)[0]) for i in range(3)]
    assert together.tolist() == alone
