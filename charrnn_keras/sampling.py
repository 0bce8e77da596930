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
from charrnn_keras.errors import SamplingError
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
        kernel: the LSTM products (``generation.Generator``); ``auto``, the fastest measured
            on this kind of CPU, is what ``charrnn export`` chooses on it too.
    """

    def __init__(self, cfg: ModelConfig, vocab: Vocab, model=None, kernel: str = "auto"):
        self.cfg = cfg
        self.vocab = vocab
        if model is None:
            model = build_model(cfg, len(vocab), batch_size=1, seq_length=1, name="sampler")
        self.model = model
        self.generator = generation.Generator(model, vocab, kernel=kernel)
        self._owner = None  # the generation that last reset the state
        self._state_vars = [v for layer in rnn_layers(model) for v in layer.states]
        # Fixed signatures: every call passes tensors of these shapes, so each traces once.
        # autograph=False: the loops and branches are tf.while_loop / tf.cond already, and
        # converting Keras's and our Python to check for others took most of the first trace.
        self._feed = tf.function(
            self._feed_ids, autograph=False, input_signature=[tf.TensorSpec([None], tf.int32)]
        )
        self._draw = tf.function(
            self._draw_chunk,
            autograph=False,
            input_signature=[
                tf.TensorSpec([], tf.int32),  # the last character fed
                tf.TensorSpec([], tf.int32),  # how many to draw
                tf.TensorSpec([], tf.float32),  # temperature
                tf.TensorSpec([], tf.int32),  # top_k
                tf.TensorSpec([], tf.float32),  # top_p
                tf.TensorSpec([2], tf.int64),  # seed
                tf.TensorSpec([], tf.int64),  # position of the first draw
                tf.TensorSpec([], tf.bool),  # strategy "words"
            ],
        )

    @classmethod
    def from_run_dir(
        cls, run_dir: str | Path, checkpoint: str | Path | None = None, kernel: str = "auto"
    ) -> Sampler:
        """Builds a sampler from a run directory's config, vocabulary and weights.

        Args:
            run_dir: a directory written by ``charrnn train``.
            checkpoint: a weights file or a name in the run's checkpoints/ (default: the best).
            kernel: the LSTM products (see ``Sampler``).

        Returns:
            A Sampler holding that checkpoint's weights.
        """
        model, cfg, vocab = generation.load_sampling_model(run_dir, checkpoint)
        return cls(cfg.model, vocab, model, kernel)

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
        top_p: float = 1.0,
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
            top_p: draw only among the most likely characters whose probabilities add up to
                ``top_p``, after the temperature (nucleus sampling; 1 = all).

        Returns:
            An iterator over the generated characters (the prime is not repeated).
        """
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        self.generator.check(strategy, num_chars=num_chars, **settings)
        ids = self.vocab.encode(self.prepare_prime(prime))
        return self._run(ids, num_chars, strategy, **settings)

    def sample(self, prime: str, num_chars: int, **kwargs) -> str:
        """Returns the generated text (without the prime); takes ``generate``'s arguments."""
        return "".join(self.generate(prime, num_chars, **kwargs))

    def samples(
        self, prime: str, num_chars: int, num_samples: int, seed: int = 0, **kwargs
    ) -> list[str]:
        """Returns ``num_samples`` texts from one batched call, with seeds ``seed``,
        ``seed + 1``, ...; each equals ``sample(..., seed=seed + i)`` byte for byte.

        Args:
            prime: the text to start from (see ``generate``).
            num_chars: characters per sample.
            num_samples: how many samples (1 or more).
            seed: the first sample's seed.
            **kwargs: ``temperature``, ``top_k``, ``top_p``, ``strategy``, as ``generate``.

        Returns:
            The texts, without the prime.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise SamplingError(f"num_samples must be an integer, 1 or more, got {num_samples!r}")
        strategy = kwargs.pop("strategy", "sample")
        settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kwargs}
        last = seed + num_samples - 1 if isinstance(seed, int) else seed
        for s in (seed, last):
            self.generator.check(strategy, num_chars=num_chars, seed=s, **settings)
        ids = self.vocab.encode(self.prepare_prime(prime))
        n = num_samples
        draw = generation.Draw(
            temperature=tf.fill([n], float(settings["temperature"])),
            top_k=tf.fill([n], int(settings["top_k"])),
            top_p=tf.fill([n], float(settings["top_p"])),
            seed=tf.constant([[seed + i, 0] for i in range(n)], tf.int64),
            words=tf.fill([n], strategy == "words"),
        )
        rows = tf.constant([ids] * n, tf.int32)
        out = self._batch(rows, tf.constant(num_chars, tf.int32), draw).numpy()
        return [self.vocab.decode(row) for row in out]

    def trace_count(self) -> int:
        """How many graphs the compiled feed and draw have traced: 2 while every call reuses
        them (a retrace per call would cost more than the characters it draws)."""
        return sum(f.experimental_get_tracing_count() for f in (self._feed, self._draw))

    def _run(self, ids, num_chars, strategy, temperature, top_k, top_p, seed) -> Iterator[str]:
        token = object()
        self._owner = token
        reset_states(self.model)
        if len(ids) > 1:
            self._feed(tf.constant(ids[:-1], tf.int32))
        settings = (
            tf.constant(temperature, tf.float32),
            tf.constant(top_k, tf.int32),
            tf.constant(top_p, tf.float32),
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

    def _draw_chunk(self, prev, count, temperature, top_k, top_p, seed, start, words):
        """Draws ``count`` characters after ``prev`` from the stored state; stores the new one."""
        draw = generation.Draw(temperature[None], top_k[None], top_p[None], seed, words[None])
        drawn, _, states = self.generator.draw(prev[None], self._read_states(), count, draw, start)
        self._write_states(states)
        return drawn[0]

    @tf.function(autograph=False)
    def _batch(self, rows, count, draw):
        """Generates from ``rows`` of prime ids with explicit state (the stored one is kept)."""
        gen = self.generator
        batch, length = tf.shape(rows)[0], tf.shape(rows)[1]
        states = gen.feed(rows, tf.fill([batch], length - 1), gen.zero_states(batch))
        drawn, _, _ = gen.draw(rows[:, -1], states, count, draw, tf.constant(0, tf.int64))
        return drawn
