"""Text generation: the 1x1 stateful sampling model and its chunked draw loop.

The sampling model has the training model's layers with ``batch_shape=(1, 1)``, so it loads the
same weights and keeps its recurrent state in the layers between calls. Characters are drawn in
chunks: one call of a compiled ``tf.function`` runs a ``tf.while_loop`` of ``model.step`` and
``draw.draw_next`` over up to ``CHUNK`` characters, then writes the state back to the layers.
The exported ``generate`` signature runs the same ``model.step`` and ``draw_next``, and draws
are keyed by ``(seed, position)``, so it reproduces this text byte for byte.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterator
from pathlib import Path

import tensorflow as tf

from charrnn_keras import rundir
from charrnn_keras.config import ModelConfig
from charrnn_keras.draw import draw_next, seed_pair
from charrnn_keras.errors import SamplingError, option
from charrnn_keras.model import build_model, reset_states, rnn_layers, step
from charrnn_keras.vocab import Vocab, VocabError, format_chars

logger = logging.getLogger(__name__)

STRATEGIES = ("sample", "words")
UNKNOWN = ("error", "skip")
_MAX_LISTED = 20  # unknown characters named in one error line
# Characters per compiled call: the first chunk is short so that text starts at once; later
# ones amortise the call (about 1 ms) over many characters.
FIRST_CHUNK = 16
CHUNK = 256


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_settings(num_chars, temperature, top_k, strategy, seed, vocab_size: int) -> None:
    """Raises SamplingError for generation settings no sample can use.

    Args:
        num_chars: characters to generate, 0 or more.
        temperature: a finite number, 0 or more (0 = argmax).
        top_k: 0 (all characters) up to ``vocab_size``.
        strategy: one of ``STRATEGIES``.
        seed: an integer that fits in int64 (it becomes the stateless seed ``[seed, 0]``).
        vocab_size: the run's vocabulary size.
    """
    if not _is_int(num_chars) or num_chars < 0:
        raise SamplingError(f"num_chars must be an integer, 0 or more, got {num_chars!r}")
    ok = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
    if not ok or not math.isfinite(temperature) or temperature < 0:
        raise SamplingError(
            f"temperature must be a finite number, 0 or more (0 = most likely), got {temperature!r}"
        )
    if not _is_int(top_k) or not 0 <= top_k <= vocab_size:
        raise SamplingError(
            f"top_k must be an integer from 0 (all) to the vocabulary size {vocab_size}, "
            f"got {top_k!r}"
        )
    if strategy not in STRATEGIES:
        raise SamplingError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not _is_int(seed) or not -(2**63) <= seed < 2**63:
        raise SamplingError(f"seed must be an integer that fits in 64 bits, got {seed!r}")


class Sampler:
    """Generates text with a trained model, one character at a time.

    One Sampler holds one recurrent state, so it runs one generation at a time: starting a new
    ``generate`` iterator makes an older, unfinished one raise on its next character.

    Args:
        cfg: the run's model settings (its ``[model]`` table).
        vocab: the run's vocabulary.
    """

    def __init__(self, cfg: ModelConfig, vocab: Vocab):
        self.cfg = cfg
        self.vocab = vocab
        self.model = build_model(cfg, len(vocab), batch_size=1, seq_length=1, name="sampler")
        self._space = vocab.index.get(" ")
        self._owner = None  # the generation that last reset the state
        self._state_vars = [v for layer in rnn_layers(self.model) for v in layer.states]
        # Fixed signatures: every call passes tensors of these shapes, so each traces once.
        self._feed = tf.function(self._feed_ids, input_signature=[tf.TensorSpec([None], tf.int32)])
        self._draw = tf.function(
            self._draw_chunk,
            input_signature=[
                tf.TensorSpec([], tf.int32),  # the last character fed
                tf.TensorSpec([], tf.int32),  # how many to draw
                tf.TensorSpec([], tf.float32),  # temperature
                tf.TensorSpec([], tf.int32),  # top_k
                tf.TensorSpec([2], tf.int64),  # seed
                tf.TensorSpec([], tf.int64),  # position of the first draw
                tf.TensorSpec([], tf.bool),  # strategy "words"
            ],
        )

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, checkpoint: str | Path | None = None) -> Sampler:
        """Builds a sampler from a run directory's config, vocabulary and weights.

        Args:
            run_dir: a directory written by ``charrnn train``.
            checkpoint: a weights file or a name in the run's checkpoints/ (default: the best).

        Returns:
            A Sampler holding that checkpoint's weights.
        """
        cfg, vocab = rundir.load_run(run_dir)
        path = rundir.find_checkpoint(run_dir, checkpoint)
        sampler = cls(cfg.model, vocab)
        rundir.load_weights(sampler.model, path, vocab)
        logger.debug("sampling with %s", path)
        return sampler

    def set_weights_from(self, model) -> None:
        """Copies the weights of a model with the same layers (e.g. the training model)."""
        self.model.set_weights(model.get_weights())

    def prepare_prime(self, prime: str, unknown: str = "error") -> str:
        """Returns the prime that will actually be fed to the model.

        Args:
            prime: the text to start from.
            unknown: what to do with characters missing from the vocabulary: ``error`` raises
                a VocabError naming them, ``skip`` drops them.

        Returns:
            The prime without unknown characters; an empty prime becomes a newline if the
            vocabulary has one, else its most frequent character.
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
        if not prime:
            prime = "\n" if "\n" in self.vocab.index else self.vocab.most_frequent()
        return prime

    def generate(
        self,
        prime: str,
        num_chars: int,
        temperature: float = 1.0,
        top_k: int = 0,
        strategy: str = "sample",
        seed: int = 0,
    ) -> Iterator[str]:
        """Streams generated characters, each as soon as it is drawn.

        Settings are checked now; the state is reset and the prime fed when iteration starts.

        Args:
            prime: the text to start from (unknown characters raise; see ``prepare_prime``).
            num_chars: how many characters to generate.
            temperature: divides the logits; 0 means always the most likely character.
            top_k: draw only among the k most likely characters (0 = all).
            strategy: ``sample`` draws every character; ``words`` draws only after a space
                and takes the most likely character inside a word.
            seed: the same run, prime, settings and seed give the same text in any process.

        Returns:
            An iterator over the generated characters (the prime is not repeated).
        """
        check_settings(num_chars, temperature, top_k, strategy, seed, len(self.vocab))
        ids = self.vocab.encode(self.prepare_prime(prime))
        if strategy == "words" and self._space is None and temperature > 0:
            logger.warning("the vocabulary has no space, so strategy 'words' is always argmax")
        return self._run(ids, num_chars, float(temperature), int(top_k), strategy, int(seed))

    def sample(self, prime: str, num_chars: int, **kwargs) -> str:
        """Returns the generated text (without the prime); takes ``generate``'s arguments."""
        return "".join(self.generate(prime, num_chars, **kwargs))

    def _run(self, ids, num_chars, temperature, top_k, strategy, seed) -> Iterator[str]:
        token = object()
        self._owner = token
        reset_states(self.model)
        if len(ids) > 1:
            self._feed(tf.constant(ids[:-1], tf.int32))
        settings = (
            tf.constant(temperature, tf.float32),
            tf.constant(top_k, tf.int32),
            seed_pair(seed),
        )
        words = tf.constant(strategy == "words")
        prev, position = int(ids[-1]), 0
        while position < num_chars:
            if self._owner is not token:
                raise RuntimeError("another generate() on this Sampler has reset its state")
            # The last prime character is fed first, so its logits give the draw at position 0.
            count = min(num_chars - position, FIRST_CHUNK if position == 0 else CHUNK)
            drawn = self._draw(
                tf.constant(prev, tf.int32),
                tf.constant(count, tf.int32),
                *settings,
                tf.constant(position, tf.int64),
                words,
            ).numpy()
            for char_id in drawn:
                if self._owner is not token:
                    raise RuntimeError("another generate() on this Sampler has reset its state")
                yield self.vocab.chars[char_id]
            prev, position = int(drawn[-1]), position + count

    def _read_states(self):
        return [tf.convert_to_tensor(v) for v in self._state_vars]

    def _write_states(self, states) -> None:
        for var, value in zip(self._state_vars, states, strict=True):
            var.assign(value)

    def _feed_ids(self, ids):
        """Runs ``ids`` through the model one at a time, only to advance the state."""

        def body(i, states):
            _, states = step(self.model, tf.reshape(ids[i], [1]), states)
            return i + 1, states

        _, states = tf.while_loop(
            lambda i, _: i < tf.size(ids), body, (tf.constant(0), self._read_states())
        )
        self._write_states(states)

    def _draw_chunk(self, prev, count, temperature, top_k, seed, start, words):
        """Feeds ``prev``, draws the next character, feeds it, and so on ``count`` times.

        With ``words``, a character inside a word (after anything but a space) is the most
        likely one; after a space it is drawn.

        Returns:
            int32 ``[count]``: the drawn ids.
        """
        space = tf.constant(-1 if self._space is None else self._space, tf.int32)
        zero = tf.constant(0.0, tf.float32)
        out = tf.TensorArray(tf.int32, size=count)

        def body(i, prev, states, out):
            logits, states = step(self.model, tf.reshape(prev, [1]), states)
            temp = tf.where(words & (prev != space), zero, temperature)
            drawn = draw_next(logits, temp, top_k, seed, start + tf.cast(i, tf.int64))[0]
            return i + 1, drawn, states, out.write(i, drawn)

        _, _, states, out = tf.while_loop(
            lambda i, *_: i < count, body, (tf.constant(0), prev, self._read_states(), out)
        )
        self._write_states(states)
        return out.stack()
