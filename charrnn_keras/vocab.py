"""The character vocabulary: the sorted set of characters of a corpus, stored as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from charrnn_keras import atomic
from charrnn_keras.errors import VocabError

__all__ = ["Vocab", "VocabError", "format_chars"]


class Vocab:
    """Maps characters to ids and back; ids follow code point order.

    Args:
        chars: the distinct characters, one code point each.
        counts: how often each character occurs in the corpus (same order), if known.
    """

    def __init__(self, chars, counts=None):
        chars = list(chars)
        if not chars:
            raise ValueError(f"a vocabulary needs at least one character, got chars={chars!r}")
        if any(len(c) != 1 for c in chars):
            raise ValueError(f"every vocabulary entry must be one character, got {chars!r}")
        if chars != sorted(set(chars)):
            raise ValueError("vocabulary characters must be sorted and distinct")
        if counts is not None and len(counts) != len(chars):
            raise ValueError(f"counts has {len(counts)} entries for {len(chars)} characters")
        self.chars = chars
        self.counts = None if counts is None else [int(c) for c in counts]
        self.index = {c: i for i, c in enumerate(chars)}
        self.codepoints = np.array([ord(c) for c in chars], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.chars == other.chars

    @classmethod
    def from_codepoints(cls, codepoints: np.ndarray) -> tuple[Vocab, np.ndarray]:
        """Builds the vocabulary of a corpus given as code points and encodes it.

        Args:
            codepoints: the corpus as a 1-D integer array of Unicode code points.

        Returns:
            ``(vocab, ids)`` where ``ids`` is the corpus as the smallest unsigned dtype that fits.
        """
        if codepoints.dtype == np.uint8:
            return cls._from_bytes(codepoints)
        unique, inverse, counts = np.unique(codepoints, return_inverse=True, return_counts=True)
        dtype = np.uint8 if len(unique) <= 256 else np.uint16 if len(unique) <= 65536 else np.uint32
        vocab = cls([chr(c) for c in unique], counts)
        return vocab, inverse.astype(dtype)

    @classmethod
    def _from_bytes(cls, codepoints: np.ndarray) -> tuple[Vocab, np.ndarray]:
        """``from_codepoints`` for ASCII text through a 256-entry table.

        ``np.unique(return_inverse=True)`` sorts an int64 copy, about 26 bytes of memory per
        character at peak; counting and a table lookup need one byte per character.
        """
        counts = np.zeros(256, dtype=np.int64)
        chunk = 1 << 24
        for start in range(0, len(codepoints), chunk):
            counts += np.bincount(codepoints[start : start + chunk], minlength=256)
        unique = np.flatnonzero(counts)
        table = np.zeros(256, dtype=np.uint8)
        table[unique] = np.arange(len(unique), dtype=np.uint8)
        return cls([chr(c) for c in unique], counts[unique]), table[codepoints]

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of ``text``; raises VocabError listing any unknown characters."""
        unknown = self.unknown(text)
        if unknown:
            raise VocabError(f"characters not in the vocabulary: {format_chars(unknown)}")
        return np.array([self.index[c] for c in text], dtype=np.int32)

    def unknown(self, text: str) -> list[str]:
        """Returns the distinct characters of ``text`` missing from the vocabulary, in order."""
        return sorted({c for c in text if c not in self.index})

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def most_frequent(self) -> str:
        """Returns the most frequent character, or the first one when counts are unknown."""
        if self.counts is None:
            return self.chars[0]
        return self.chars[int(np.argmax(self.counts))]

    def to_json(self) -> str:
        return json.dumps({"chars": self.chars, "counts": self.counts}, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        """Writes the vocabulary as JSON, atomically (a temporary file, then a rename)."""
        atomic.write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Reads a vocabulary written by ``save``; raises VocabError naming the file if unusable."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(raw["chars"], raw.get("counts"))
        except FileNotFoundError:
            raise VocabError(f"vocabulary file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                ValueError) as e:  # fmt: skip
            raise VocabError(
                f"vocabulary file {path} is damaged ({e}); retrain or restore it from a copy"
            ) from None


def format_chars(chars) -> str:
    """Shows characters unambiguously, e.g. ``'é' (U+00E9), '\\t' (U+0009)``."""
    return ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars)
