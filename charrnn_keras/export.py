"""Export a run as a versioned SavedModel for TF Serving: ``export/<model-name>/<version>/``.

The SavedModel has three signatures (names in ``serving.names``): ``generate`` (also
``serving_default``) runs a whole generation in one call, ``step`` runs one character with
explicit state, and ``metadata`` describes the vocabulary and the model. All of them run
``generation.Generator`` on the sampling model's layers with state passed in and out, so nothing
is kept on the server between requests: the stateful layers' state variables are never read.

It is written by Keras' own ``keras.export.ExportArchive``, which saves the raw ``tf.Variable``
behind each Keras weight once (TF Serving's graph-mode loader refuses a SavedModel that holds
the same variable twice) and tracks the vocabulary's lookup table as an asset.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from charrnn_keras import atomic, export_graph, generation
from charrnn_keras import batching as batching_lib
from charrnn_keras.errors import ServingError, StorageError, option
from charrnn_keras.limits import STRATEGIES
from charrnn_keras.serving import names, policy, warmup

log = logging.getLogger(__name__)


# generate's inputs: every one has the batch first.
_ROW_SPECS = [
    tf.TensorSpec([None], tf.string, names.PRIME),
    tf.TensorSpec([None], tf.int32, names.NUM_CHARS),
    tf.TensorSpec([None], tf.float32, names.TEMPERATURE),
    tf.TensorSpec([None], tf.int32, names.TOP_K),
    tf.TensorSpec([None], tf.float32, names.TOP_P),
    tf.TensorSpec([None, 2], tf.int64, names.SEED),
    tf.TensorSpec([None], tf.string, names.STRATEGY),
]


class ExportModule:
    """What the SavedModel serves: the Generator, the vocabulary table, three signatures.

    Args:
        model: the 1x1 sampling model from ``build_model``, weights loaded.
        cfg: the run's Config.
        vocab: the run's Vocab.
        max_chars: the largest ``num_chars`` that ``generate`` accepts, and the longest prime
            (in characters).
        max_batch_chars: the most characters one ``generate`` request may feed and draw,
            summed over its rows (prime bytes, at least 1, + num_chars per row): its work.
        max_rows: the most primes one ``generate`` request may hold: its memory, since each
            row carries its own recurrent state and gate activations.
        batching: BatchingParameters: run the generation in TensorFlow's BatchFunction op,
            which merges concurrent requests (``batching.batched``); None runs each alone.
        weights_dtype: the kernels ``generate`` multiplies by (``Generator``): ``float32``,
            the text of ``charrnn sample``, or ``bfloat16``, opt-in: half the weight memory
            read per character, faster at batch 8 on CPUs with native bf16 but slower at
            batch 1 (BENCHMARKS.md, 3), and not the float32 text.
        fused: False generates with Keras's cells, as exports before ``lstm_step`` did (the
            ``matmul`` kernel's text, slower; for comparisons).
        kernel: ``generate``'s products (see ``export_run``).
    """

    def __init__(
        self,
        model,
        cfg,
        vocab,
        max_chars: int = names.DEFAULT_MAX_CHARS,
        max_batch_chars: int = names.DEFAULT_MAX_BATCH_CHARS,
        max_rows: int = names.DEFAULT_MAX_ROWS,
        batching=None,
        weights_dtype: str = "float32",
        fused: bool = True,
        kernel: str = "auto",
        freeze: bool = True,
    ):
        self.gen = generation.Generator(model, vocab, fused, weights_dtype, kernel, freeze)
        self.cfg, self.vocab = cfg, vocab
        self.table = export_graph.prime_table(vocab)
        self.state_names = [name for name, _ in self.gen.layout]
        self.bounds = {"max_chars": int(max_chars), "vocab_size": len(vocab)}
        self.max_batch_chars, self.max_rows = int(max_batch_chars), int(max_rows)
        self.batching, self._rows = batching, self._generate_rows
        if batching is not None:  # each request is checked alone, before it joins a batch
            self._rows = batching_lib.batched(self._generate_rows, batching, _ROW_SPECS)

    def generate(self, prime, num_chars, temperature, top_k, top_p, seed, strategy):
        """Generates text after each prime, in one graph call; every input has one row per
        prime, so TF Serving's request batching can merge requests.

        Row b is exactly what the same row sent alone returns, and with seed ``[S, 0]`` what
        ``charrnn sample --seed S`` prints after the prime: its prime (unknown characters
        skipped; empty means the fallback prime) is fed, then its ``num_chars[b]`` characters
        are drawn by ``draw_next`` at positions 0, 1, ... with its own settings and seed.
        Settings outside ``limits.LIMITS``, rows of different lengths, primes longer than
        ``max_chars``, and requests over ``max_rows`` or ``max_batch_chars`` fail with
        InvalidArgumentError (gRPC INVALID_ARGUMENT) before any work.

        Returns:
            ``{"text": string [batch]}``: the continuations, UTF-8.
        """
        settings = {"num_chars": num_chars, "temperature": temperature, "top_k": top_k,
                    "top_p": top_p}  # fmt: skip
        checks = export_graph.graph_checks(settings, self.bounds)
        rows = tf.size(prime, out_type=tf.int64)
        sizes = [tf.shape(t, out_type=tf.int64)[0] for t in (*settings.values(), seed, strategy)]
        # The work is rows x (longest prime + longest row), as the loops run to the longest;
        # an empty prime still feeds the fallback character. int64, so nothing wraps.
        longest = tf.reduce_max(tf.concat([tf.cast(tf.strings.length(prime), tf.int64), [1]], 0))
        most = tf.reduce_max(tf.concat([tf.cast(num_chars, tf.int64), [0]], 0))
        cost = rows * (longest + most)
        # Counted in code points; a prime that is not valid UTF-8 counts at most its bytes.
        prime_chars = tf.reduce_max(tf.concat([tf.strings.length(prime, unit="UTF8_CHAR"), [0]], 0))
        max_chars = self.bounds["max_chars"]
        choices = tf.constant(STRATEGIES)
        checks += [
            tf.debugging.Assert(
                tf.reduce_all(tf.stack(sizes) == rows),
                ["every input must have one row per prime; rows per input (num_chars, "
                 "temperature, top_k, top_p, seed, strategy) and primes:", tf.stack(sizes), rows],
            ),
            tf.debugging.Assert(
                tf.reduce_all(tf.reduce_any(strategy[:, None] == choices[None, :], axis=1)),
                [f"strategy must be one of {', '.join(STRATEGIES)}, got", strategy],
            ),
            tf.debugging.Assert(
                prime_chars <= max_chars,
                [f"a prime may be at most {max_chars} characters, got", prime_chars],
            ),
            tf.debugging.Assert(
                rows <= self.max_rows,
                [f"a request may hold at most {self.max_rows} primes, got", rows],
            ),
            tf.debugging.Assert(
                cost <= self.max_batch_chars,
                [f"a request may feed and draw at most {self.max_batch_chars} characters "
                 "(primes x (longest prime in bytes + largest num_chars)), got", cost],
            ),
        ]  # fmt: skip
        with tf.control_dependencies(checks):
            prime, num_chars = tf.identity(prime), tf.identity(num_chars)
        out = self._rows(prime, num_chars, temperature, top_k, top_p, seed, strategy)
        if self.batching is None:
            return {names.TEXT: out[0]}
        return {names.TEXT: out[0], names.BATCH_SIZE: out[1]}

    def _generate_rows(self, prime, num_chars, temperature, top_k, top_p, seed, strategy):
        """The generation itself, on rows already checked: [text] alone, [text, batch size]
        in the BatchFunction (the rows it ran with, padding included: the op's own evidence
        that requests were merged)."""
        draw = generation.Draw(temperature, top_k, top_p, seed, words=strategy == "words")
        text = export_graph.generate_graph(self.gen, self.table, prime, num_chars, draw)
        if self.batching is None:
            return [text]
        return [text, tf.fill(tf.shape(prime), tf.size(prime))]

    def step(self, inputs):
        """One character with explicit state: {char_ids, <state>...} -> {logits, <state>...}."""
        states = [inputs[n] for n in self.state_names]
        logits, new_states = self.gen.step(inputs[names.CHAR_IDS][:, 0], states)
        out = {names.LOGITS: logits}
        out.update(zip(self.state_names, new_states, strict=True))
        return out

    def metadata(self):
        """The vocabulary and the model's settings, for clients."""
        m = self.cfg.model
        return {
            names.CHARS: tf.constant(self.vocab.chars),
            names.CODEPOINTS: tf.constant(self.vocab.codepoints.astype(np.int64)),
            names.STATE_NAMES: tf.constant(self.state_names),
            names.CELL: tf.constant(m.cell),
            names.NUM_LAYERS: tf.constant(m.num_layers, tf.int32),
            names.RNN_SIZE: tf.constant(m.rnn_size, tf.int32),
            names.EMBEDDING_DIM: tf.constant(m.embedding_dim, tf.int32),
            names.VOCAB_SIZE: tf.constant(len(self.vocab), tf.int32),
            names.MAX_CHARS: tf.constant(self.bounds["max_chars"], tf.int32),
            names.MAX_BATCH_CHARS: tf.constant(self.max_batch_chars, tf.int64),
            names.MAX_ROWS: tf.constant(self.max_rows, tf.int32),
            names.SIGNATURE_VERSION: tf.constant(names.GENERATE_VERSION, tf.int32),
            names.FALLBACK_PRIME: tf.constant(self.gen.fallback),
            names.CONFIG_TOML: tf.constant(self.cfg.to_toml()),
        }

    def archive(self) -> keras.export.ExportArchive:
        """Returns the ExportArchive with the three signatures (``generate`` first, so it is
        also ``serving_default``)."""
        spec = tf.TensorSpec
        archive = keras.export.ExportArchive()
        archive.track(self.table)  # a lookup table is tracked by hand, as Keras documents
        archive.add_endpoint(names.GENERATE, self.generate, input_signature=_ROW_SPECS)
        step_spec = {names.CHAR_IDS: spec([None, 1], tf.int32, names.CHAR_IDS)}
        for name, size in self.gen.layout:
            step_spec[name] = spec([None, size], tf.float32, name)
        archive.add_endpoint(names.STEP, self.step, input_signature=[step_spec])
        archive.add_endpoint(names.METADATA, self.metadata, input_signature=[])
        return archive


def export_run(
    run_dir,
    export_dir="export",
    model_name: str = "charrnn",
    version: int | None = None,
    checkpoint=None,
    max_chars: int = names.DEFAULT_MAX_CHARS,
    batching_parameters_file=None,
    weights_dtype: str = "float32",
    kernel: str = "auto",
    freeze: bool = True,
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
        max_chars: the largest ``num_chars`` a ``generate`` request may ask for, and its
            longest prime in characters, 0 to 2**31-1 (the signature's int32).
        batching_parameters_file: a BatchingParameters text proto: ``generate`` then runs in
            TensorFlow's BatchFunction op with them, merging concurrent requests in any server.
        weights_dtype: ``float32`` or, opt-in, ``bfloat16`` kernels for ``generate`` (see
            ``ExportModule``).
        kernel: ``generate``'s LSTM products (``generation.Generator``): ``auto``, the
            fastest measured on the exporting machine's kind of CPU, as ``charrnn sample``
            chooses there; ``matmul`` (for AVX-512 and AMX servers) or ``matvec`` (for AVX2
            ones) to export for another kind.

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
    params = None
    if batching_parameters_file is not None:
        params = batching_lib.read_parameters(batching_parameters_file)
    model, cfg, vocab = generation.load_sampling_model(run_dir, checkpoint)
    module = ExportModule(model, cfg, vocab, max_chars, batching=params,
                          weights_dtype=weights_dtype, kernel=kernel, freeze=freeze)  # fmt: skip
    archive = module.archive()
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only or full export_dir; e.filename is the folder refused
        raise atomic.storage_error(e, e.filename or model_dir) from None
    atomic.remove_stale(model_dir)
    try:
        # The temporary name is not all digits, so TF Serving never takes a half-written export.
        with atomic.replacing(final, folder=True) as tmp:
            archive.write_out(str(tmp), verbose=False)
            warmup.write(tmp, model_name, max_chars)
    except OSError:  # rename() refuses a non-empty target, so a racing export's version stays
        raise ServingError(
            f"{final} appeared while exporting; versions are never overwritten"
        ) from None
    except tf.errors.OpError as e:  # TensorFlow reports the file system's refusals as its own
        error = _storage_error(e, final)
        if error is None:  # not the file system's refusal: a bug, keep its traceback
            raise
        raise error from None
    policy.write_models_config(export_dir)
    parameters = Path(export_dir) / batching_lib.BATCHING_PARAMETERS
    if not parameters.exists():  # a file the user tuned stays as it is
        batching_lib.write_parameters(parameters)
    fused = module.gen.fused
    log.info("exported %s (generate: %s)", final, f"{fused.kernel} kernel" if fused else "cells")
    return final


# TensorFlow reports the file system's refusals as its own errors, not as OSError.
_TF_ERRNOS = {"ResourceExhaustedError": errno.ENOSPC, "PermissionDeniedError": errno.EACCES}
_MESSAGE_ERRNOS = {"No space left": errno.ENOSPC, "Read-only file system": errno.EROFS,
                   "Permission denied": errno.EACCES, "Disk quota": errno.EDQUOT}  # fmt: skip


def _storage_error(e: tf.errors.OpError, path: Path) -> StorageError | None:
    """Returns the StorageError for a write of ``path`` that TensorFlow refused with ``e``, or
    None when ``e`` is not the file system's refusal."""
    code = _TF_ERRNOS.get(type(e).__name__) or next(
        (n for text, n in _MESSAGE_ERRNOS.items() if text in str(e)), None
    )
    if code is None:
        return None
    return atomic.storage_error(OSError(code, os.strerror(code), str(path)), path)
