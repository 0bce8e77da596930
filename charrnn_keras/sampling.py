"""Text generation: the 1x1 stateful sampling model and its one-character draw loop.

The sampling model has the training model's layers with ``batch_shape=(1, 1)``, so it loads the
same weights and keeps its recurrent state in the layers between calls. Each generated
character costs one call of a compiled ``tf.function`` (model step + ``draw.draw_next``), never
``model.predict``. Draws are keyed by ``(seed, position)``, so the exported SavedModel, which
uses the same ``draw_next``, reproduces this text byte for byte.
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
from charrnn_keras.errors import CharRNNError
from charrnn_keras.model import build_model, reset_states
from charrnn_keras.vocab import Vocab, VocabError, format_chars

logger = logging.getLogger(__name__)

STRATEGIES = ("sample", "words")
UNKNOWN = ("error", "skip")
_MAX_LISTED = 20  # unknown characters named in one error line


class SamplingError(CharRNNError):
    """Generation settings that cannot be used; the message shows the value received."""


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
        # Fixed signatures: every call passes tensors of these shapes, so each traces once.
        self._feed = tf.function(self._feed_ids, input_signature=[tf.TensorSpec([None], tf.int32)])
        self._step = tf.function(
            self._step_id,
            input_signature=[
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.float32),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([2], tf.int64),
                tf.TensorSpec([], tf.int64),
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
        rundir.load_weights(sampler.model, path)
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
                    f"{listed}; remove them, or pass --unknown skip to drop them"
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
        sampled = tf.constant(temperature, tf.float32)
        greedy = tf.constant(0.0, tf.float32)
        top_k_t = tf.constant(top_k, tf.int32)
        seed_t = seed_pair(seed)
        prev = int(ids[-1])
        for position in range(num_chars):
            if self._owner is not token:
                raise RuntimeError("another generate() on this Sampler has reset its state")
            # The last prime character is fed here, so its logits give the draw at position 0.
            words_inside = strategy == "words" and prev != self._space
            prev = int(
                self._step(
                    tf.constant(prev, tf.int32),
                    greedy if words_inside else sampled,
                    top_k_t,
                    seed_t,
                    tf.constant(position, tf.int64),
                )
            )
            yield self.vocab.chars[prev]

    def _feed_ids(self, ids):
        """Runs ``ids`` through the model one at a time, only to advance the state."""
        for i in tf.range(tf.size(ids)):
            self.model(tf.reshape(ids[i], [1, 1]), training=False)

    def _step_id(self, char_id, temperature, top_k, seed, position):
        """Feeds one character and draws the next one's id."""
        logits = self.model(tf.reshape(char_id, [1, 1]), training=False)[:, -1, :]
        return draw_next(logits, temperature, top_k, seed, position)[0]
