"""Text generation: one explicit-state, batch-aware core under the local sampler and the export.

``Generator`` runs a built sampling model's own layers (``model.step`` semantics: Embedding,
each recurrent layer's cell, Dense) on state passed in and out, feeds primes of different
lengths, and draws characters with per-row settings. ``sampling.Sampler`` streams from it in
chunks; ``export.ExportModule`` runs a whole generation in one graph. The draw is
``draw.draw_next``, keyed by ``(seed, position)``, so both write the same text by construction.

The settings' limits are one table, ``limits.LIMITS``: ``limits.check_settings`` refuses bad
Python values, and ``export_graph.graph_checks`` builds the same checks as graph asserts
(INVALID_ARGUMENT over gRPC) with the same messages.
"""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

from charrnn_keras import checkpoints, draw_loop, lstm_step, rundir
from charrnn_keras.draw import Draw, draw_next
from charrnn_keras.errors import SamplingError, VocabError, option
from charrnn_keras.limits import INT32_MAX, KERNELS, STRATEGIES, UNKNOWN, check_settings
from charrnn_keras.model import build_model
from charrnn_keras.vocab import Vocab, format_chars

logger = logging.getLogger(__name__)

_MAX_LISTED = 20  # unknown characters named in one error line
_STATE_PARTS = {1: ("h",), 2: ("h", "c")}  # a cell's state tensors, as Keras orders them


def fallback_prime(vocab: Vocab) -> str:
    """The prime of an empty request: a newline if the vocabulary has one, else its most
    frequent character."""
    return "\n" if "\n" in vocab.index else vocab.most_frequent()


def state_layout(model: keras.Model) -> list[tuple[str, int]]:
    """Returns ``(name, size)`` of each recurrent state tensor, bottom layer first.

    Read from the layers (``layer.cell.state_size``), so any cell Keras has works; names are
    the layer's name and ``h`` / ``c`` (e.g. ``lstm_1_h``, ``lstm_1_c``, ``gru_2_h``).
    """
    layout = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.RNN):
            sizes = _state_sizes(layer)
            layout += [
                (f"{layer.name}_{p}", s)
                for p, s in zip(_STATE_PARTS[len(sizes)], sizes, strict=True)
            ]
    return layout


def _state_sizes(layer) -> list[int]:
    sizes = layer.cell.state_size
    return [int(s) for s in sizes] if isinstance(sizes, (list, tuple)) else [int(sizes)]


def load_sampling_model(run_dir, checkpoint=None) -> tuple[keras.Model, object, Vocab]:
    """Builds a run's 1x1 sampling model and loads its weights.

    Args:
        run_dir: a directory written by ``charrnn train``.
        checkpoint: a weights file or a name in the run's checkpoints/ (default: the best,
            else the latest).

    Returns:
        ``(model, config, vocab)``.
    """
    cfg, vocab = rundir.load_run(run_dir)
    path = checkpoints.find_checkpoint(run_dir, checkpoint)
    model = build_model(cfg.model, len(vocab), batch_size=1, seq_length=1, name="sampler")
    checkpoints.load_weights(model, path, vocab)
    logger.debug("generating with %s", path)
    return model, cfg, vocab


class Generator:
    """Generation with explicit state over a built sampling model's layers.

    Nothing here reads or writes the stateful layers' own state, so the same object serves the
    stateful local sampler (which stores the state between calls) and the stateless export.

    ``feed`` and ``draw`` run ``lstm_step.FusedStep`` where the model is one it computes (LSTM
    layers, as ``build_model`` makes them): Keras's numbers in fewer ops per character, so the
    same text faster. ``step`` runs Keras's cells, or with the ``matvec`` kernel the fused step
    (each row alone), so that it is always ``draw``'s step bit for bit.

    Args:
        model: a model from ``build_model`` (any batch size), weights loaded.
        vocab: its vocabulary.
        fused: use the FusedStep where it applies; False runs Keras's cells in every loop.
        weights_dtype: the FusedStep's kernels, ``float32`` or ``bfloat16`` (faster at larger
            batches where the CPU multiplies bf16 natively, but not the float32 text).
        kernel: the FusedStep's products (``lstm_step.FusedStep``): ``auto``, the fastest
            measured on this CPU's kind (``lstm_step.default_kernel``); ``matmul``, Keras's
            cells at the padded row count; ``matvec``, one matrix-vector product per row,
            Keras's 1x1 model's numbers with no padding; ``block``.
        freeze: the plain draw holds the weights' values as graph constants (an export's
            weights never change; a Sampler's may, so it reads them on every call).
    """

    def __init__(
        self,
        model: keras.Model,
        vocab: Vocab,
        fused: bool = True,
        weights_dtype: str = "float32",
        kernel: str = "auto",
        freeze: bool = False,
    ):
        self.model, self.vocab = model, vocab
        self.layout = state_layout(model)
        self.space_id = vocab.index.get(" ", -1)
        self.fallback = fallback_prime(vocab)
        self.fused, self.freeze = None, freeze
        if kernel not in KERNELS:  # checked for every model, not only LSTM ones
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel}")
        if fused and lstm_step.supported(model):
            self.fused = lstm_step.FusedStep(model, weights_dtype, kernel)
        elif weights_dtype != "float32":
            raise SamplingError(f"weights_dtype {weights_dtype} needs a model of LSTM layers")
        # Each row multiplied alone: its bits are its own in any batch, so no padding rows.
        self.rowwise = self.fused is not None and self.fused.kernel == "matvec"

    # -- Python side: what a request means -----------------------------------------------------

    def prepare_prime(self, prime: str, unknown: str = "error") -> str:
        """Returns the prime that will actually be fed to the model.

        Args:
            prime: the text to start from.
            unknown: what to do with characters missing from the vocabulary: ``error`` raises
                a VocabError naming them, ``skip`` drops them (as the export does).

        Returns:
            The prime without unknown characters; an empty prime becomes ``fallback``.
        """
        if unknown not in UNKNOWN:
            raise SamplingError(f"unknown must be one of {', '.join(UNKNOWN)}, got {unknown!r}")
        if not isinstance(prime, str):
            raise SamplingError(f"prime must be a str, got {type(prime).__name__} {prime!r:.60}")
        missing = self.vocab.unknown(prime)
        if missing:
            listed = format_chars(missing[:_MAX_LISTED])
            if len(missing) > _MAX_LISTED:
                listed += f" and {len(missing) - _MAX_LISTED} more"
            if unknown == "error":
                raise VocabError(
                    f"the prime has {len(missing)} character(s) not in this run's vocabulary: "
                    f"{listed}; remove them, or pass {option('unknown', 'skip')} to drop them"
                )
            prime = "".join(c for c in prime if c in self.vocab.index)
            logger.warning("dropped from the prime (not in the vocabulary): %s", listed)
        return prime or self.fallback

    def check(self, strategy: str = "sample", max_chars: int = INT32_MAX, **settings) -> None:
        """Raises SamplingError for settings no generation can use (see ``LIMITS``)."""
        check_settings(settings, {"max_chars": max_chars, "vocab_size": len(self.vocab)})
        if strategy not in STRATEGIES:
            raise SamplingError(
                f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}"
            )
        if strategy == "words" and self.space_id < 0 and settings.get("temperature", 1) > 0:
            logger.warning("the vocabulary has no space, so strategy 'words' is always argmax")

    # -- graph side: the computation -----------------------------------------------------------

    def zero_states(self, batch) -> list:
        return [tf.zeros([batch, size], tf.float32) for _, size in self.layout]

    def step(self, char_ids, states: list):
        """Runs one character per row through the layers (dropout off).

        Args:
            char_ids: int32 ``[batch]`` ids.
            states: float32 ``[batch, size]`` tensors in ``layout`` order.

        Returns:
            ``(logits [batch, vocab], new_states)``.
        """
        if self.rowwise:
            return self.fused.once(char_ids, states)
        batch = tf.shape(char_ids)[0]
        logits, states = self._step(*_pad_rows([char_ids, states], batch))
        return logits[:batch], [s[:batch] for s in states]

    def _step(self, char_ids, states: list):
        x, new_states, k = None, [], 0
        for layer in self.model.layers:
            if isinstance(layer, keras.layers.Embedding):
                x = layer(char_ids)
            elif isinstance(layer, keras.layers.RNN):
                n = len(_state_sizes(layer))
                x, s = layer.cell(x, states[k : k + n], training=False)
                new_states += list(s) if isinstance(s, (list, tuple)) else [s]
                k += n
            elif isinstance(layer, keras.layers.Dense):
                x = layer(x)
        return x, new_states

    def feed(self, ids, lengths, states: list) -> list:
        """Advances each row's state over the first ``lengths[b]`` ids of its row.

        Args:
            ids: int32 ``[batch, time]`` ids, padded.
            lengths: int32 ``[batch]``; rows past their length keep their state.
            states: the state to start from.

        Returns:
            The new states.
        """
        batch = tf.shape(lengths)[0]
        ids, lengths, states = self._pad([ids, lengths, states], batch)
        if self.fused is not None:
            weights = self.fused.weights(rows=ids.shape[0])
            states = draw_loop.feed(self.fused, weights, ids, lengths, states)
            return [s[:batch] for s in states]

        def body(t, states):
            _, new = self._step(ids[:, t], states)
            active = (t < lengths)[:, None]
            return t + 1, [tf.where(active, n, o) for n, o in zip(new, states, strict=True)]

        _, states = tf.while_loop(
            lambda t, _: t < tf.reduce_max(lengths), body, (tf.constant(0), states)
        )
        return [s[:batch] for s in states]

    def _pad(self, structure, batch):
        """``_pad_rows`` unless each row is multiplied alone (``rowwise``)."""
        if self.rowwise:
            return structure
        return _pad_rows(structure, batch)

    def draw(self, prev, states: list, count, settings: Draw, start):
        """Feeds ``prev``, draws the next character, feeds it, and so on ``count`` times.

        Args:
            prev: int32 ``[batch]``: the last character fed (the prime's last one at first).
            states: the state before ``prev`` is fed.
            count: int32 scalar, characters to draw.
            settings: the rows' draw settings.
            start: int64 scalar, the position of the first draw (draws are keyed by position).

        Returns:
            ``(ids [batch, count], last id [batch], states)``.
        """
        batch = tf.shape(prev)[0]
        shared_seed = settings.seed.shape.rank == 1  # one seed for all rows: nothing to pad
        rows = settings._replace(seed=()) if shared_seed else settings
        prev, states, rows = self._pad([prev, states, rows], batch)
        settings = rows._replace(seed=settings.seed) if shared_seed else rows
        if self.fused is not None:
            step = self.fused
            known = prev.shape[0]  # when tracing for one row (charrnn sample)
            frozen = step.weights(frozen=True, rows=known) if self.freeze else None
            ids, prev, states = draw_loop.draw(step, step.weights(rows=known), prev, states, count,
                                               settings, start, self.space_id, frozen)  # fmt: skip
            return _batch_major(ids)[:batch], prev[:batch], [s[:batch] for s in states]
        # Slot 0 is a dummy so that stack() works for count == 0.
        out = tf.TensorArray(tf.int32, size=count + 1, element_shape=tf.TensorShape([None]))
        out = out.write(0, tf.zeros_like(prev))
        t, words = settings.temperature, settings.words

        def body(i, prev, states, out):
            logits, states = self._step(prev, states)
            temperature = tf.where(words & (prev != self.space_id), 0.0, t)
            drawn = draw_next(logits, temperature, settings.top_k, settings.seed,
                              start + tf.cast(i, tf.int64), settings.top_p)  # fmt: skip
            return i + 1, drawn, states, out.write(i + 1, drawn)

        _, prev, states, out = tf.while_loop(
            lambda i, *_: i < count, body, (tf.constant(0), prev, states, out)
        )
        ids = _batch_major(out.stack()[1:])
        return ids[:batch], prev[:batch], [s[:batch] for s in states]


def _pad_rows(structure, batch):
    """``structure``'s tensors (``[batch, ...]`` each) with copies of row 0 appended up to
    ``lstm_step.padded_rows(batch)`` rows, so that a row gets the same bits in any batch."""
    extra = lstm_step.padded_rows(batch) - batch
    return tf.nest.map_structure(
        lambda x: tf.concat([x, tf.repeat(x[:1], extra, axis=0)], axis=0), structure
    )


def _batch_major(ids):
    """``[time, batch]`` ids as ``[batch, time]``.

    Transposed as float32, exact for ids below 2**24 (Unicode has fewer code points): oneDNN's
    int32 transpose logs an ERROR line ("oneDNN supports DT_INT32 only on platforms with
    AVX-512") on CPUs without its int32 support, on every process's first generation.
    """
    return tf.cast(tf.transpose(tf.cast(ids, tf.float32)), tf.int32)
