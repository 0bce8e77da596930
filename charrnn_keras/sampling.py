"""Streaming text from the 1x1 stateful sampling model.

The sampling model has the training model's layers with ``batch_shape=(1, 1)``, so it loads the
same weights and keeps its recurrent state in the layers between calls. Characters come from
``generation.Generator`` in chunks: one call of a compiled ``tf.function`` draws up to
``CHUNK`` characters, then writes the state back to the layers. The export runs the same
Generator in one graph, so it writes the same text byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import tensorflow as tf

from charrnn_keras import generation
from charrnn_keras.config import ModelConfig
from charrnn_keras.draw import seed_pair
from charrnn_keras.model import build_model, reset_states, rnn_layers
from charrnn_keras.vocab import Vocab

# Characters per compiled call: the first chunk is short so that text starts at once; later
# ones amortise the call (about 1 ms) over many characters.
FIRST_CHUNK = 16
CHUNK = 256


class Sampler:
    """Generates text with a trained model, one character at a time.

    One Sampler holds one recurrent state, so it runs one generation at a time: starting a new
    ``generate`` iterator makes an older, unfinished one raise on its next character.

    Args:
        cfg: the run's model settings (its ``[model]`` table).
        vocab: the run's vocabulary.
        model: the built 1x1 sampling model, if already made (else it is built from ``cfg``).
    """

    def __init__(self, cfg: ModelConfig, vocab: Vocab, model=None):
        self.cfg = cfg
        self.vocab = vocab
        if model is None:
            model = build_model(cfg, len(vocab), batch_size=1, seq_length=1, name="sampler")
        self.model = model
        self.generator = generation.Generator(model, vocab)
        self._owner = None  # the generation that last reset the state
        self._state_vars = [v for layer in rnn_layers(model) for v in layer.states]
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
        model, cfg, vocab = generation.load_sampling_model(run_dir, checkpoint)
        return cls(cfg.model, vocab, model)

    def set_weights_from(self, model) -> None:
        """Copies the weights of a model with the same layers (e.g. the training model)."""
        self.model.set_weights(model.get_weights())

    def prepare_prime(self, prime: str, unknown: str = "error") -> str:
        """See ``generation.Generator.prepare_prime``."""
        return self.generator.prepare_prime(prime, unknown)

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
        self.generator.check(
            strategy, num_chars=num_chars, temperature=temperature, top_k=top_k, seed=seed
        )
        ids = self.vocab.encode(self.prepare_prime(prime))
        return self._run(ids, num_chars, float(temperature), int(top_k), strategy, int(seed))

    def sample(self, prime: str, num_chars: int, **kwargs) -> str:
        """Returns the generated text (without the prime); takes ``generate``'s arguments."""
        return "".join(self.generate(prime, num_chars, **kwargs))

    def trace_count(self) -> int:
        """How many graphs the compiled feed and draw have traced: 2 while every call reuses
        them (a retrace per call would cost more than the characters it draws)."""
        return sum(f.experimental_get_tracing_count() for f in (self._feed, self._draw))

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
        """Advances the stored state over ``ids``."""
        states = self.generator.feed(ids[None, :], tf.size(ids)[None], self._read_states())
        self._write_states(states)

    def _draw_chunk(self, prev, count, temperature, top_k, seed, start, words):
        """Draws ``count`` characters after ``prev`` from the stored state; stores the new one."""
        drawn, _, states = self.generator.draw(
            prev[None], self._read_states(), count, temperature[None], top_k[None], seed, start,
            words[None],
        )  # fmt: skip
        self._write_states(states)
        return drawn[0]
