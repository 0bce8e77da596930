"""Export a run as a versioned SavedModel for TF Serving: ``export/<model-name>/<version>/``.

The SavedModel has three signatures (names in ``serving.names``): ``generate`` (also
``serving_default``) runs a whole generation in one call, ``step`` runs one character with
explicit state, and ``metadata`` describes the vocabulary and the model. All of them run the
sampling model's own layers through ``model.step`` with state passed in and out, so nothing is
kept on the server between requests: the stateful layers' state variables are never read.

Only the raw ``tf.Variable`` behind each Keras weight is tracked by the exported module. A
``tf.Module`` holding the Keras variables themselves saves them twice, which
``tf.saved_model.load`` tolerates but TF Serving's graph-mode loader does not.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path

import numpy as np
import tensorflow as tf

from charrnn_keras import atomic, rundir
from charrnn_keras import model as model_lib
from charrnn_keras.draw import draw_next
from charrnn_keras.errors import ServingError, option
from charrnn_keras.serving import names

log = logging.getLogger(__name__)

TMP_PREFIX = "tmp-"  # not all digits, so TF Serving never takes a half-written export


class ExportModule(tf.Module):
    """The exported object: raw weight variables, the vocabulary table, three signatures.

    Args:
        model: the 1x1 sampling model from ``build_model``, weights loaded.
        cfg: the run's Config.
        vocab: the run's Vocab.
        max_chars: the largest ``num_chars`` that ``generate`` accepts.
    """

    def __init__(self, model, cfg, vocab, max_chars: int = names.DEFAULT_MAX_CHARS):
        super().__init__(name="charrnn_export")
        # The raw tf.Variables; the stateful layers' state is not among the model's weights.
        self.weights = [w.value for w in model.weights]
        codepoints = vocab.codepoints.astype(np.int64)
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(codepoints), tf.range(len(vocab), dtype=tf.int64)
            ),
            default_value=-1,
        )
        fallback = "\n" if "\n" in vocab.index else vocab.most_frequent()
        # A SimpleNamespace is not tracked by tf.Module: the Keras model's variables must not
        # be saved a second time next to ``self.weights``.
        self._info = types.SimpleNamespace(
            model=model,
            cfg=cfg,
            codepoints=codepoints,
            chars=list(vocab.chars),
            fallback=fallback,
            fallback_id=vocab.index[fallback],
            state_names=model_lib.state_names(cfg.model),
            max_chars=int(max_chars),
        )

    def _step(self, ids, states):
        return model_lib.step(self._info.model, ids, states)

    def _zero_states(self, batch):
        units = self._info.cfg.model.rnn_size
        return [tf.zeros([batch, units], tf.float32) for _ in self._info.state_names]

    def _prime_ids(self, prime):
        """Returns (ids [B, T] padded, lengths [B]); unknown chars dropped, empty -> fallback."""
        cps = tf.strings.unicode_decode(prime, "UTF-8", errors="ignore")
        ids = tf.ragged.map_flat_values(self.table.lookup, tf.cast(cps, tf.int64))
        ids = tf.ragged.boolean_mask(ids, ids >= 0)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        # One padding column, so that the first column exists even when every prime is empty.
        dense = tf.pad(tf.cast(ids.to_tensor(0), tf.int32), [[0, 0], [0, 1]])
        empty = lengths == 0
        first = tf.where(empty, self._info.fallback_id, dense[:, 0])
        dense = tf.concat([first[:, None], dense[:, 1:]], axis=1)
        return dense, tf.maximum(lengths, 1)

    def _feed_prime(self, dense, lengths):
        """Runs each row's prime through the step; rows past their length keep their state."""
        batch = tf.shape(dense)[0]
        logits0 = tf.zeros([batch, len(self._info.chars)], tf.float32)

        def body(t, logits, states):
            new_logits, new_states = self._step(dense[:, t], states)
            active = (t < lengths)[:, None]
            states = [tf.where(active, n, o) for n, o in zip(new_states, states, strict=True)]
            return t + 1, tf.where(active, new_logits, logits), states

        _, logits, states = tf.while_loop(
            lambda t, *_: t < tf.reduce_max(lengths),
            body,
            (tf.constant(0), logits0, self._zero_states(batch)),
        )
        return logits, states

    def generate(self, prime, num_chars, temperature, top_k, seed):
        """Generates ``num_chars`` characters after each prime, in one graph call.

        Each row's prime (unknown characters skipped; empty means the fallback prime) is fed
        through the step, then the n-th character is drawn by ``draw_next`` at position n, as
        the local Sampler does. All rows share one seed, so a batch's rows differ from each
        other; row 0 equals the same prime sent alone. Settings the local sampler refuses
        (num_chars below 0 or above the cap, a negative or non-finite temperature, top_k
        outside 0..vocabulary size) fail with InvalidArgumentError (gRPC INVALID_ARGUMENT).

        Returns:
            ``{"text": string [batch]}``: the continuations, UTF-8.
        """
        vocab_size = len(self._info.chars)
        checks = [
            tf.debugging.assert_non_negative(num_chars, message="num_chars must be 0 or more"),
            tf.debugging.assert_less_equal(
                num_chars,
                tf.constant(self._info.max_chars, tf.int32),
                message=f"num_chars must be at most {self._info.max_chars} (the export's cap)",
            ),
            # The local sampler's check_settings refuses these too; draw_next would otherwise
            # treat a negative or NaN temperature as 0 and clamp top_k without saying so.
            tf.debugging.Assert(
                tf.math.is_finite(temperature) & (temperature >= 0),
                ["temperature must be a finite number, 0 or more, got", temperature],
            ),
            tf.debugging.Assert(
                (top_k >= 0) & (top_k <= vocab_size),
                [f"top_k must be from 0 (all) to the vocabulary size {vocab_size}, got", top_k],
            ),
        ]
        with tf.control_dependencies(checks):
            num_chars = tf.identity(num_chars)
        dense, lengths = self._prime_ids(prime)
        logits, states = self._feed_prime(dense, lengths)
        batch = tf.shape(dense)[0]
        # Slot 0 is a dummy so that stack() works even for num_chars == 0.
        out = tf.TensorArray(tf.int32, size=num_chars + 1, element_shape=tf.TensorShape([None]))
        out = out.write(0, tf.zeros([batch], tf.int32))

        def body(n, logits, states, out):
            ids = draw_next(logits, temperature, top_k, seed, n)
            logits, states = self._step(ids, states)
            return n + 1, logits, states, out.write(n + 1, ids)

        *_, out = tf.while_loop(
            lambda n, *_: n < num_chars, body, (tf.constant(0), logits, states, out)
        )
        ids = tf.transpose(out.stack()[1:])
        cps = tf.gather(tf.constant(self._info.codepoints.astype(np.int32)), ids)
        return {names.TEXT: tf.strings.unicode_encode(cps, "UTF-8")}

    def step(self, inputs):
        """One character with explicit state: {char_ids, <state>...} -> {logits, <state>...}."""
        states = [inputs[n] for n in self._info.state_names]
        logits, new_states = self._step(inputs[names.CHAR_IDS][:, 0], states)
        out = {names.LOGITS: logits}
        out.update(zip(self._info.state_names, new_states, strict=True))
        return out

    def metadata(self):
        """The vocabulary and the model's settings, for clients."""
        info, cfg = self._info, self._info.cfg
        return {
            names.CHARS: tf.constant(info.chars),
            names.CODEPOINTS: tf.constant(info.codepoints),
            names.STATE_NAMES: tf.constant(info.state_names),
            names.CELL: tf.constant(cfg.model.cell),
            names.NUM_LAYERS: tf.constant(cfg.model.num_layers, tf.int32),
            names.RNN_SIZE: tf.constant(cfg.model.rnn_size, tf.int32),
            names.EMBEDDING_DIM: tf.constant(cfg.model.embedding_dim, tf.int32),
            names.VOCAB_SIZE: tf.constant(len(info.chars), tf.int32),
            names.MAX_CHARS: tf.constant(info.max_chars, tf.int32),
            names.FALLBACK_PRIME: tf.constant(info.fallback),
            names.CONFIG_TOML: tf.constant(cfg.to_toml()),
        }

    def signatures(self) -> dict:
        """Returns the concrete functions to save, keyed by signature name."""
        spec = tf.TensorSpec
        generate = tf.function(self.generate, autograph=False).get_concrete_function(
            spec([None], tf.string, names.PRIME),
            spec([], tf.int32, names.NUM_CHARS),
            spec([], tf.float32, names.TEMPERATURE),
            spec([], tf.int32, names.TOP_K),
            spec([2], tf.int64, names.SEED),
        )
        units = self._info.cfg.model.rnn_size
        step_spec = {names.CHAR_IDS: spec([None, 1], tf.int32, names.CHAR_IDS)}
        for n in self._info.state_names:
            step_spec[n] = spec([None, units], tf.float32, n)
        step = tf.function(self.step, autograph=False).get_concrete_function(step_spec)
        metadata = tf.function(self.metadata, autograph=False).get_concrete_function()
        return {names.GENERATE: generate, names.SERVING_DEFAULT: generate,
                names.STEP: step, names.METADATA: metadata}  # fmt: skip


def load_sampling_model(run_dir, checkpoint=None):
    """Builds the 1x1 sampling model of a run and loads its weights.

    Args:
        run_dir: a run directory from ``charrnn train``.
        checkpoint: a weights file (default: the best, else the latest checkpoint).

    Returns:
        ``(model, cfg, vocab)``.
    """
    cfg, vocab = rundir.load_run(run_dir)
    path = rundir.find_checkpoint(run_dir, checkpoint)
    model = model_lib.build_model(cfg.model, len(vocab), batch_size=1, seq_length=1)
    rundir.load_weights(model, path)
    log.info("loaded %s", path)
    return model, cfg, vocab


def export_run(
    run_dir,
    export_dir="export",
    model_name: str = "charrnn",
    version: int | None = None,
    checkpoint=None,
    max_chars: int = names.DEFAULT_MAX_CHARS,
) -> Path:
    """Writes ``export_dir/model_name/version/`` atomically and refreshes ``models.config``.

    The version folder is written under a temporary name (``atomic.replacing``) with the
    umask's permissions, so a TF Serving running as another user can read it; temporaries that
    a killed export left behind are removed first.

    Args:
        run_dir: a run directory from ``charrnn train``.
        export_dir: TF Serving's base directory (one folder per model).
        model_name: the model's folder and serving name.
        version: the version to write, 0 to 2**63-1 (TF Serving's int64; default: one above
            the highest present); never replaced.
        checkpoint: a weights file (default: the best, else the latest checkpoint).
        max_chars: the largest ``num_chars`` a ``generate`` request may ask for, 0 to
            2**31-1 (the signature's int32).

    Returns:
        The path of the new version directory.
    """
    names.check_model_name(model_name)
    max_chars = names.check_int("max_chars", max_chars, "int32", minimum=0)
    model_dir = Path(export_dir) / model_name
    if version is None:
        existing = names.list_versions(model_dir, complete_only=False)
        version = existing[-1] + 1 if existing else 1
        if version > names.INT64_RANGE[1]:
            raise ServingError(
                f"{model_dir} already holds version {existing[-1]}, the largest TF Serving "
                f"accepts; choose a free one with {option('version')}"
            )
    version = names.check_int("version", version, "int64", minimum=0)
    final = model_dir / str(version)
    if final.exists():
        raise ServingError(f"{final} already exists; versions are never overwritten")
    model, cfg, vocab = load_sampling_model(run_dir, checkpoint)
    module = ExportModule(model, cfg, vocab, max_chars)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise atomic.storage_error(e, model_dir) from None
    atomic.remove_stale(model_dir)
    try:
        # The temporary name is not all digits, so TF Serving never takes a half-written export.
        with atomic.replacing(final, folder=True) as tmp:
            tf.saved_model.save(module, str(tmp), signatures=module.signatures())
    except OSError:  # rename() refuses a non-empty target, so a racing export's version stays
        raise ServingError(
            f"{final} appeared while exporting; versions are never overwritten"
        ) from None
    write_models_config(export_dir)
    log.info("exported %s", final)
    return final


def write_models_config(export_dir, base_path: str | None = None) -> Path:
    """Writes ``export_dir/models.config`` listing every model folder, in TF Serving's format.

    The file is a ``ModelServerConfig`` text proto built with TF Serving's own message and
    ``text_format``, so any path (quotes, backslashes, non-ASCII) is escaped as TF Serving reads it.

    Args:
        export_dir: TF Serving's base directory.
        base_path: where the server sees ``export_dir``; default its absolute path here, so
            ``tensorflow_model_server --model_config_file=...`` works as written, and Docker
            does with ``export_dir`` mounted at the same path (see export/README.md).

    Returns:
        The path of the written file.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    export_dir = Path(export_dir)
    base_path = str(export_dir.resolve()) if base_path is None else base_path
    models = sorted(p.name for p in export_dir.iterdir() if p.is_dir() and names.list_versions(p))
    config = model_server_config_pb2.ModelServerConfig()
    for name in models:
        config.model_config_list.config.add(
            name=name, base_path=f"{base_path.rstrip('/')}/{name}", model_platform="tensorflow"
        )
    path = export_dir / names.MODELS_CONFIG
    atomic.write_text(path, text_format.MessageToString(config, as_utf8=True))
    return path
