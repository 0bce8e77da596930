"""Export: TF Serving layout, atomic versions, signatures, graph-mode loading, same text."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from reference import reference_generate

from charrnn_keras import atomic, cli, generation, lstm_step
from charrnn_keras import model as model_lib
from charrnn_keras.config import Config, ModelConfig
from charrnn_keras.errors import CharRNNError
from charrnn_keras.export import export_run
from charrnn_keras.sampling import Sampler
from charrnn_keras.serving import names, warmup
from charrnn_keras.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]

# (prime, temperature, top_k, seed): unknown characters, an empty prime, greedy, top-k.
CASES = [
    ("the cat", 1.0, 0, 3),
    ("", 0.0, 0, 1),
    ("the dog\u00e9\U0001f600 sat", 0.7, 3, 5),
    ("\n", 2.0, 0, 9),
]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def exported(tiny_run, export_dir) -> Path:
    """Version 1 of the tiny run, exported once for the module."""
    return export_run(tiny_run, export_dir, "charrnn")


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(str(exported))


def run_generate(fn, primes, num_chars, temperature, top_k, seed, top_p=1.0, strategy="sample"):
    """Calls a loaded ``generate`` signature with the same settings for every row (seed S is
    ``[S, 0]``; a list gives one value per row); returns the decoded texts."""

    def rows(value, dtype):
        return tf.constant(value if isinstance(value, list) else [value] * len(primes), dtype)

    seeds = seed if isinstance(seed, list) else [seed] * len(primes)
    out = fn(
        prime=tf.constant(primes, tf.string),
        num_chars=rows(num_chars, tf.int32),
        temperature=rows(temperature, tf.float32),
        top_k=rows(top_k, tf.int32),
        top_p=rows(top_p, tf.float32),
        seed=tf.constant([[s, 0] for s in seeds], tf.int64, shape=[len(primes), 2]),
        strategy=rows(strategy, tf.string),
    )
    return [t.decode("utf-8") for t in out[names.TEXT].numpy()]


@functools.cache
def _sampling_model(run_dir):
    return generation.load_sampling_model(run_dir)


def python_generate(run_dir, prime, num_chars, temperature, top_k, seed) -> str:
    """The oracle (tests/reference.py): the naive loop over the stateful 1x1 model."""
    model, _, vocab = _sampling_model(run_dir)
    return reference_generate(model, vocab, prime, num_chars, temperature, top_k, seed)


def python_step(model, vocab, ids, states):
    """One explicit-state step of the run's layers, as the ``step`` signature computes it."""
    return generation.Generator(model, vocab).step(tf.constant(ids, tf.int32), states)


def random_run(run_dir: Path, cell: str, text: str = "the cat sat.\n") -> Path:
    """An untrained run directory (random weights): cheap, for shapes and other cells."""
    cfg = Config(model=ModelConfig(cell=cell, embedding_dim=4, rnn_size=8, num_layers=2))
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    vocab = Vocab(sorted(set(text)))
    vocab.save(run_dir / "vocab.json")
    model = model_lib.build_model(cfg.model, len(vocab), batch_size=1, seq_length=1)
    model.save_weights(run_dir / "checkpoints" / "best.weights.h5")
    return run_dir


def test_layout_versions_and_models_config(tiny_run, export_dir, exported, capsys):
    assert exported == export_dir / "charrnn" / "1"
    assert (exported / "saved_model.pb").exists() and (exported / "variables").is_dir()
    args = ["export", "--run-dir", str(tiny_run), "--export-dir", str(export_dir)]
    assert cli.main([*args, "--version", "5", "--max-chars", "7"]) == 0
    assert cli.main(args) == 0  # next above the highest
    assert names.list_versions(export_dir / "charrnn") == [1, 5, 6]
    assert "exported SavedModel" in capsys.readouterr().out
    meta = tf.saved_model.load(str(export_dir / "charrnn" / "5")).signatures[names.METADATA]()
    assert int(meta[names.MAX_CHARS]) == 7
    config = (export_dir / "models.config").read_text()
    assert config.startswith("model_config_list {") and 'name: "charrnn"' in config
    assert (
        f'base_path: "{export_dir.resolve()}/charrnn"' in config
        and 'model_platform: "tensorflow"' in config
    )


def test_export_kernel_flag_reaches_the_graph(tiny_run, export_dir, exported):
    args = ["export", "--run-dir", str(tiny_run), "--export-dir", str(export_dir)]
    assert cli.main([*args, "--version", "2", "--kernel", "matvec"]) == 0
    assert cli.main([*args, "--version", "3", "--kernel", "matmul"]) == 0

    def op_types(version):
        graph = tf.Graph()
        with tf.compat.v1.Session(graph=graph) as session:
            tf.compat.v1.saved_model.loader.load(session, [names.SERVE_TAG],
                                                 str(export_dir / "charrnn" / version))  # fmt: skip
            meta = graph.as_graph_def()
        return {n.op for f in meta.library.function for n in f.node_def} | {n.op for n in meta.node}

    assert "BatchMatMulV2" in op_types("2") and "BatchMatMulV2" not in op_types("3")
    # Version 1 has the default, auto: the kernel measured fastest on this kind of CPU.
    assert ("BatchMatMulV2" in op_types("1")) == (lstm_step.default_kernel() == "matvec")


def test_existing_version_is_never_overwritten(tiny_run, export_dir, exported, capsys):
    before = (exported / "saved_model.pb").read_bytes()
    with pytest.raises(CharRNNError, match="already exists"):
        export_run(tiny_run, export_dir, "charrnn", version=1)
    args = ["export", "--run-dir", str(tiny_run), "--export-dir", str(export_dir)]
    assert cli.main([*args, "--version", "1"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert (exported / "saved_model.pb").read_bytes() == before


def test_user_errors(tiny_run, tmp_path):
    with pytest.raises(CharRNNError, match="model name"):
        export_run(tiny_run, tmp_path, "../up")
    with pytest.raises(CharRNNError, match="version must be from 0 to"):
        export_run(tiny_run, tmp_path, "charrnn", version=-1)
    empty = random_run(tmp_path / "run", "lstm")
    (empty / "checkpoints" / "best.weights.h5").unlink()
    with pytest.raises(CharRNNError, match="no checkpoint"):
        export_run(empty, tmp_path / "export", "charrnn")
    assert not (tmp_path / "export" / "charrnn").exists()


def test_signatures_names_dtypes_shapes(tiny_run, exported):
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString((exported / "saved_model.pb").read_bytes())
    (meta_graph,) = saved.meta_graphs
    assert list(meta_graph.meta_info_def.tags) == [names.SERVE_TAG]
    sigs = meta_graph.signature_def
    for name in (names.GENERATE, names.SERVING_DEFAULT, names.STEP, names.METADATA):
        assert sigs[name].method_name == names.PREDICT_METHOD

    def spec(infos):
        return {k: (tf.as_dtype(v.dtype), [d.size for d in v.tensor_shape.dim])
                for k, v in infos.items()}  # fmt: skip

    generate = {
        names.PRIME: (tf.string, [-1]),
        names.NUM_CHARS: (tf.int32, [-1]),
        names.TEMPERATURE: (tf.float32, [-1]),
        names.TOP_K: (tf.int32, [-1]),
        names.TOP_P: (tf.float32, [-1]),
        names.SEED: (tf.int64, [-1, 2]),
        names.STRATEGY: (tf.string, [-1]),
    }
    for name in (names.GENERATE, names.SERVING_DEFAULT):
        assert spec(sigs[name].inputs) == generate
        assert spec(sigs[name].outputs) == {names.TEXT: (tf.string, [-1])}
    model, cfg, vocab = _sampling_model(tiny_run)
    layout = generation.state_layout(model)
    states = {n: (tf.float32, [-1, size]) for n, size in layout}
    assert spec(sigs[names.STEP].inputs) == {names.CHAR_IDS: (tf.int32, [-1, 1]), **states}
    assert spec(sigs[names.STEP].outputs) == {names.LOGITS: (tf.float32, [-1, len(vocab)]),
                                              **states}  # fmt: skip
    assert not sigs[names.METADATA].inputs
    assert set(sigs[names.METADATA].outputs) == {
        names.CHARS, names.CODEPOINTS, names.STATE_NAMES, names.CELL, names.NUM_LAYERS,
        names.RNN_SIZE, names.EMBEDDING_DIM, names.VOCAB_SIZE, names.MAX_CHARS,
        names.MAX_BATCH_CHARS, names.MAX_ROWS, names.SIGNATURE_VERSION, names.FALLBACK_PRIME,
        names.CONFIG_TOML,
    }  # fmt: skip
    # Only the weights are saved, each once: no stateful-layer state, no duplicates.
    saved_vars = [n for n, _ in tf.train.list_variables(str(exported / "variables" / "variables"))
                  if not n.startswith("_CHECKPOINTABLE")]  # fmt: skip
    assert len(saved_vars) == len(model.weights) == len(model.trainable_weights)


_FRESH = """
import json, sys
import numpy as np
import tensorflow as tf
tf.compat.v1.disable_eager_execution()
path, cases = sys.argv[1], json.loads(sys.argv[2])
result = {"ours_imported": any(m.startswith("charrnn_keras") for m in sys.modules)}
with tf.compat.v1.Session(graph=tf.Graph()) as sess:
    sigs = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path).signature_def
    def run(name, feeds):
        sig = sigs[name]
        fetch = {k: v.name for k, v in sig.outputs.items()}
        return sess.run(fetch, {sig.inputs[k].name: v for k, v in feeds.items()})
    meta = run("metadata", {})
    result["chars"] = [c.decode() for c in meta["chars"]]
    result["texts"] = {}
    for name in ("generate", "serving_default"):
        result["texts"][name] = [run(name, {
            "prime": np.array([p.encode()], object), "num_chars": np.array([40], np.int32),
            "temperature": np.array([t], np.float32), "top_k": np.array([k], np.int32),
            "top_p": np.array([1.0], np.float32), "strategy": np.array([b"sample"], object),
            "seed": np.array([[s, 0]], np.int64)})["text"][0].decode() for p, t, k, s in cases]
    states = {k: np.zeros([2, v.tensor_shape.dim[1].size], np.float32)
              for k, v in sigs["step"].inputs.items() if k != "char_ids"}
    logits = []
    for ids in ([1, 2], [3, 0]):
        out = run("step", {"char_ids": np.array(ids, np.int32)[:, None], **states})
        logits.append(out.pop("logits").tolist())
        states = out
    result["logits"] = logits
print(json.dumps(result))
"""


def test_graph_mode_loading_in_fresh_process(tiny_run, exported):
    """TF Serving's way: tf.compat.v1 loader with the serve tag, sess.run on tensor names."""
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, str(exported), json.dumps(CASES)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""},
        cwd=exported,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["ours_imported"]
    model, cfg, vocab = _sampling_model(tiny_run)
    assert result["chars"] == vocab.chars
    expected = [python_generate(tiny_run, *case[:1], 40, *case[1:]) for case in CASES]
    assert result["texts"]["generate"] == expected
    assert result["texts"]["serving_default"] == expected
    states = generation.Generator(model, vocab).zero_states(2)
    for ids, got in zip(([1, 2], [3, 0]), result["logits"], strict=True):
        logits, states = python_step(model, vocab, ids, states)
        np.testing.assert_array_equal(np.array(got, np.float32), logits.numpy())


@pytest.mark.parametrize("case", CASES)
def test_generate_matches_python_loop(tiny_run, loaded, case):
    prime, temperature, top_k, seed = case
    got = run_generate(loaded.signatures[names.GENERATE], [prime], 60, temperature, top_k, seed)
    assert got == [python_generate(tiny_run, prime, 60, temperature, top_k, seed)]


def test_generate_matches_sampler(tiny_run, loaded):
    sampler = Sampler.from_run_dir(tiny_run)
    for prime, temperature, top_k, seed in CASES:
        expected = sampler.sample(
            sampler.prepare_prime(prime, unknown="skip"), 80,
            temperature=temperature, top_k=top_k, seed=seed,
        )  # fmt: skip
        fn = loaded.signatures[names.GENERATE]
        assert run_generate(fn, [prime], 80, temperature, top_k, seed) == [expected]


def test_generate_batch_and_limits(loaded):
    fn = loaded.signatures[names.GENERATE]
    primes = ["the cat sat on", "", "\u00e9\u00e9", "the"]
    batch = run_generate(fn, primes, 30, 0.0, 0, 0)
    alone = [run_generate(fn, [p], 30, 0.0, 0, 0)[0] for p in primes]
    assert batch == alone and batch[1] == batch[2]  # "" and all-unknown both start from "\n"
    sampled = run_generate(fn, primes, 30, 1.0, 0, 4)
    assert sampled[0] == run_generate(fn, primes[:1], 30, 1.0, 0, 4)[0]
    assert run_generate(fn, primes, 30, 1.0, 0, 4) == sampled  # no state kept between calls
    assert run_generate(fn, primes, 0, 1.0, 0, 4) == [""] * 4
    assert run_generate(fn, [], 5, 1.0, 0, 4) == []
    for bad in (-1, names.DEFAULT_MAX_CHARS + 1):
        with pytest.raises(tf.errors.InvalidArgumentError, match="num_chars must be from 0"):
            run_generate(fn, ["the"], bad, 1.0, 0, 4)


MIXED_ROWS = [  # prime, num_chars, temperature, top_k, top_p, seed, strategy
    ("the cat", 25, 1.0, 0, 1.0, 3, "sample"),
    ("", 0, 1.0, 0, 1.0, 3, "sample"),
    ("the dog sat", 40, 0.7, 3, 1.0, 11, "words"),
    ("\u00e9the", 7, 2.0, 0, 0.6, -5, "sample"),
    ("the cat", 25, 1.0, 0, 1.0, 4, "sample"),
    ("log", 13, 0.0, 0, 1.0, 2**40, "words"),
]


def test_every_row_of_a_batch_is_its_text_alone(loaded):
    fn = loaded.signatures[names.GENERATE]
    columns = [list(c) for c in zip(*MIXED_ROWS, strict=True)]
    prime, n, t, k, p, seed, strategy = columns
    batch = run_generate(fn, prime, n, t, k, seed, p, strategy)
    alone = [run_generate(fn, [r[0]], *r[1:4], r[5], r[4], r[6])[0] for r in MIXED_ROWS]
    assert batch == alone
    assert [len(text) for text in batch] == n  # each row stops at its own num_chars
    assert batch[0] != batch[4]  # the same prime with another seed
    # Any order of the rows, any companions: the same texts.
    order = [3, 0, 5, 2, 1, 4]
    shuffled = run_generate(
        fn, *([c[i] for i in order] for c in (prime, n, t, k, seed, p, strategy))
    )
    assert shuffled == [batch[i] for i in order]


def test_exported_settings_match_the_sampler_in_every_mode(tiny_run, loaded):
    sampler = Sampler.from_run_dir(tiny_run)
    fn = loaded.signatures[names.GENERATE]
    for prime, n, t, k, p, seed, strategy in MIXED_ROWS:
        expected = sampler.sample(
            sampler.prepare_prime(prime, unknown="skip"), n, temperature=t, top_k=k, top_p=p,
            seed=seed, strategy=strategy,
        )  # fmt: skip
        assert run_generate(fn, [prime], n, t, k, seed, p, strategy) == [expected]


@pytest.mark.parametrize(
    "inputs, words",
    [
        ({"top_p": [1.5]}, "top_p must be a number from 0 to 1"),
        ({"strategy": ["beam"]}, "strategy must be one of sample, words"),
        ({"num_chars": [5, 5]}, "every input must have one row per prime"),
        ({"prime": ["a"] * (names.DEFAULT_MAX_ROWS + 1)}, "at most 1024 primes"),
        ({"prime": ["a" * 2000] * 600}, "a request may feed and draw at most"),
        ({"prime": ["the", "\u00e9" * 10_001]}, "a prime may be at most 10000 characters, got"),
    ],
)
def test_generate_refuses_bad_rows_before_any_work(loaded, inputs, words):
    fn = loaded.signatures[names.GENERATE]
    args = {"primes": ["the"], "num_chars": 5, "temperature": 1.0, "top_k": 0, "seed": 1}
    if "prime" in inputs:
        args["primes"] = inputs["prime"]
    for key in ("top_p", "strategy", "num_chars"):
        if key in inputs:
            args[key] = inputs[key]
    with pytest.raises(tf.errors.InvalidArgumentError, match=words):
        run_generate(fn, **args)


def test_other_cells_export(tmp_path):
    run_dir = random_run(tmp_path / "run", "gru")
    path = export_run(run_dir, tmp_path / "export", "gru-model")
    loaded = tf.saved_model.load(str(path))
    step = loaded.signatures[names.STEP]
    assert set(step.structured_outputs) == {names.LOGITS, "gru_1_h", "gru_2_h"}
    got = run_generate(loaded.signatures[names.GENERATE], ["cat"], 20, 1.0, 0, 2)
    assert got == [python_generate(run_dir, "cat", 20, 1.0, 0, 2)]


# Runs `charrnn export ARGS` and kills itself (SIGKILL, no clean-up) when the export has
# written the whole SavedModel into its temporary folder and is about to rename it: the last
# moment a kill can leave anything behind. No timing involved.
_KILL_BEFORE_RENAME = """
import os, signal, sys
from charrnn_keras import cli
os.rename = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_export_is_atomic_when_killed(tmp_path):
    run_dir = random_run(tmp_path / "run", "lstm")
    model_dir = tmp_path / "export" / "charrnn"
    args = ["export", "--run-dir", str(run_dir), "--export-dir", str(tmp_path / "export")]
    proc = subprocess.run([sys.executable, "-c", _KILL_BEFORE_RENAME, *args], cwd=REPO,
                          capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    (leftover,) = model_dir.iterdir()
    assert atomic.is_temp(leftover.name) and (leftover / "saved_model.pb").exists()
    assert names.list_versions(model_dir, complete_only=False) == []  # TF Serving sees nothing
    # The leftover is ignored and removed (issue 11): the next export is version 1, alone.
    assert export_run(run_dir, tmp_path / "export", "charrnn").name == "1"
    assert [p.name for p in model_dir.iterdir()] == ["1"]


def test_export_writes_tf_servings_warmup_requests(exported, loaded):
    from tensorflow_serving.apis import prediction_log_pb2

    path = exported / names.WARMUP_DIR / names.WARMUP_FILE
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(str(path))]  # fmt: skip
    assert [r.predict_log.request.model_spec.signature_name for r in records] == [
        names.GENERATE, names.SERVING_DEFAULT, names.GENERATE]  # fmt: skip
    for record, lengths in zip(records, [[2, 1], [2, 1], [warmup.SINGLE_ROW_CHARS]], strict=True):
        request = record.predict_log.request
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        texts = loaded.signatures[request.model_spec.signature_name](**inputs)[names.TEXT]
        assert [len(t.decode()) for t in texts.numpy()] == lengths  # every row answered


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_export_folders_honour_the_umask(tmp_path):
    """Issue 15, item 10: mkdtemp made every version 0700, unreadable by another user."""
    run_dir = random_run(tmp_path / "run", "lstm")
    old = os.umask(0o022)
    try:
        path = export_run(run_dir, tmp_path / "export", "charrnn")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert (path / "saved_model.pb").stat().st_mode & 0o777 == 0o644


def test_stale_temporaries_of_killed_exports_are_removed(tmp_path):
    run_dir = random_run(tmp_path / "run", "lstm")
    model_dir = tmp_path / "export" / "charrnn"
    stale = model_dir / f".3.tmp{_dead_pid()}"
    (stale / "variables").mkdir(parents=True)
    live = model_dir / f".4.tmp{os.getppid()}"  # a live process's write is left alone
    live.mkdir()
    assert export_run(run_dir, tmp_path / "export", "charrnn").name == "1"
    assert not stale.exists() and live.exists()


def test_numbers_outside_their_dtype_are_refused(tiny_run, tmp_path, capsys):
    """Issue 15, items 4 and 5: an int32 cap or an int64 version that would wrap or overflow."""
    export_dir = tmp_path / "export"
    for kwargs, words in [
        ({"max_chars": 3_000_000_000}, "max_chars"),
        ({"max_chars": -1}, "max_chars"),
        ({"version": 2**63}, "version"),
        ({"version": -1}, "version"),
    ]:
        with pytest.raises(CharRNNError, match=words):
            export_run(tiny_run, export_dir, "charrnn", **kwargs)
    assert not (export_dir / "charrnn").exists()
    args = ["export", "--run-dir", str(tiny_run), "--export-dir", str(export_dir)]
    for extra, words in [
        (["--max-chars", "3000000000"], "argument --max-chars: must be from 0 to 2147483647"),
        (["--version", "99999999999999999999"], "argument --version: must be from 0 to"),
        (["--version", "x"], "argument --version: must be a whole number"),
    ]:
        with pytest.raises(SystemExit) as info:
            cli.main([*args, *extra])
        assert info.value.code == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, err
        assert err.startswith("charrnn export: error: ") and words in err, err
    assert not (export_dir / "charrnn").exists()
    # The largest of each is accepted.
    path = export_run(tiny_run, export_dir, "charrnn", version=2**63 - 1, max_chars=2**31 - 1)
    assert names.list_versions(export_dir / "charrnn") == [2**63 - 1]
    meta = tf.saved_model.load(str(path)).signatures[names.METADATA]()
    assert int(meta[names.MAX_CHARS]) == 2**31 - 1
    with pytest.raises(CharRNNError, match="largest TF Serving accepts"):
        export_run(tiny_run, export_dir, "charrnn")


def test_models_config_is_a_text_proto_tf_serving_parses(tiny_run, tmp_path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from charrnn_keras.serving.policy import write_models_config

    export_dir = tmp_path / "export"
    for name in ("charrnn", "b.model"):
        version = export_dir / name / "1"
        version.mkdir(parents=True)
        (version / "saved_model.pb").write_bytes(b"")
    (export_dir / "empty").mkdir()  # no version: not listed
    base = 'C:\\models "quoted" \u00e9\U0001f600\n'
    path = write_models_config(export_dir, base_path=base)
    config = text_format.Parse(
        path.read_text(encoding="utf-8"), model_server_config_pb2.ModelServerConfig()
    )
    got = [(c.name, c.base_path, c.model_platform) for c in config.model_config_list.config]
    assert got == [(n, f"{base}/{n}", "tensorflow") for n in ("b.model", "charrnn")]
