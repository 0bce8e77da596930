"""Corpus reading: a file, a folder of files or the built-in text, decoded, checked, cached.

A corpus is UTF-8 text encoded as vocabulary ids; its sha256 keys an encoding cache in the run
directory's parent, so a second run on the same text skips the decode.
"""

from __future__ import annotations

import hashlib
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charrnn_keras import atomic
from charrnn_keras.errors import DataError
from charrnn_keras.vocab import Vocab, format_chars

logger = logging.getLogger(__name__)

BUILTIN = "builtin:stdlib"
BOM = b"\xef\xbb\xbf"  # U+FEFF in UTF-8: a byte-order mark, not text


@dataclass
class Corpus:
    """An encoded corpus.

    Args:
        ids: the text as vocabulary ids (unsigned ints, smallest dtype that fits).
        vocab: its vocabulary.
        source: where it came from (a path or ``builtin:stdlib``).
        digest: sha256 of the raw bytes, the cache key.
    """

    ids: np.ndarray
    vocab: Vocab
    source: str
    digest: str


def _decode(raw: bytes, name: str) -> np.ndarray:
    """Returns the code points of UTF-8 ``raw``; raises DataError naming the file and offset."""
    if b"\x00" in raw:
        offset = raw.index(b"\x00")
        raise DataError(
            f"{name} looks binary (a NUL byte at offset {offset}); give a UTF-8 text file"
        )
    data = np.frombuffer(raw, dtype=np.uint8)
    if not (data >= 0x80).any():  # ASCII: bytes are code points; saves a 4x copy on large files
        return data
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{name} is not UTF-8: invalid byte 0x{raw[e.start]:02x} at byte offset {e.start}; "
            f"convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _strip_bom(raw: bytes, name) -> bytes:
    """Drops a UTF-8 byte-order mark at the start of a file, as the ``utf-8-sig`` codec does.

    Editors on Windows write one; kept, it would become a character of the vocabulary (and
    take ASCII text off ``_decode``'s one-byte fast path).
    """
    if not raw.startswith(BOM):
        return raw
    logger.info("%s: stripped the UTF-8 byte-order mark at its start", name)
    return raw[len(BOM) :]


def check_data_path(data: str | None) -> None:
    """Raises DataError when ``data`` names no file or directory of files (None: built in)."""
    if data is not None and data != BUILTIN:
        _list_files(Path(data))


def _list_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"directory {path} has no files; put .txt files in it")
        return files
    if path.exists():  # a FIFO, a socket, a device
        raise DataError(f"data path {path} is neither a file nor a directory")
    raise DataError(f"data path {path} does not exist")


def _builtin_files() -> list[Path]:
    """The running interpreter's standard library sources, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    return sorted(
        (p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts)),
        key=lambda p: p.relative_to(stdlib).as_posix(),
    )


def read_raw(data: str | None, max_chars: int) -> tuple[bytes, str]:
    """Reads the corpus bytes.

    Args:
        data: a UTF-8 file, a directory of them (read in sorted order), or None for the
            built-in corpus (the Python standard library's sources, capped at ``max_chars``).
        max_chars: cap for the built-in corpus.

    Returns:
        ``(raw_bytes, source_description)``.
    """
    if data is None or data == BUILTIN:
        parts, total = [], 0
        for p in _builtin_files():
            try:
                text = p.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            parts.append(text)
            total += len(text)
            if total >= max_chars:
                break
        text = "\n".join(parts)[:max_chars]
        if not text:
            raise DataError("the built-in corpus is empty: no standard library sources found")
        return text.encode("utf-8"), BUILTIN
    path = Path(data)
    files = _list_files(path)
    if len(files) == 1:
        return _strip_bom(_read_bytes(files[0]), files[0]), str(path)
    chunks = []
    for f in files:
        raw = _strip_bom(_read_bytes(f), f)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("skipping %s: not UTF-8 text", f)
            continue
        if b"\x00" in raw or not raw:
            logger.warning("skipping %s: empty or binary", f)
            continue
        chunks.append(raw)
    if not chunks:
        raise DataError(f"directory {path} has no UTF-8 text files")
    return b"\n".join(chunks), str(path)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:  # permissions, a vanished file, an I/O error
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def load_corpus(data: str | None, max_chars: int, cache_dir: str | Path | None) -> Corpus:
    """Reads and encodes a corpus, reusing the encoding cached under ``cache_dir``.

    Args:
        data: see ``read_raw``.
        max_chars: cap for the built-in corpus.
        cache_dir: where encoded corpora are kept, keyed by the sha256 of their bytes.

    Returns:
        The Corpus.
    """
    raw, source = read_raw(data, max_chars)
    if not raw:
        raise DataError(f"{source} is empty; give a text with at least a few thousand characters")
    digest = hashlib.sha256(raw).hexdigest()
    cached = _cache_paths(cache_dir, digest)
    if cached and cached[0].exists() and cached[1].exists():
        try:
            ids = np.load(cached[0], allow_pickle=False)
            vocab = Vocab.load(cached[1])
            logger.info("loaded encoded corpus from cache %s", cached[0])
            return Corpus(ids, vocab, source, digest)
        except (OSError, ValueError) as e:
            logger.warning("ignoring damaged corpus cache %s: %s", cached[0], e)
    vocab, ids = Vocab.from_codepoints(_decode(raw, source))
    if cached:
        _write_cache(cached, ids, vocab)
    return Corpus(ids, vocab, source, digest)


def _write_cache(paths: tuple[Path, Path], ids: np.ndarray, vocab: Vocab) -> None:
    """Writes the encoded corpus and its vocabulary atomically; StorageError if it cannot."""
    folder = paths[0].parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.filename: the folder that could not be made, in one refusing it
        raise atomic.storage_error(e, e.filename or folder) from None
    atomic.remove_stale(folder)  # what killed processes left half written
    with atomic.replacing(paths[0]) as tmp, open(tmp, "wb") as f:
        np.save(f, ids, allow_pickle=False)  # a file object: np.save would add ".npy" to a name
    atomic.write_text(paths[1], vocab.to_json())


def _cache_paths(cache_dir, digest):
    if cache_dir is None:
        return None
    base = Path(cache_dir) / digest[:16]
    return base.with_suffix(".npy"), base.with_suffix(".vocab.json")


def check_vocab(corpus: Corpus) -> None:
    """Raises DataError for a corpus of one distinct character: there is nothing to predict."""
    if len(corpus.vocab) < 2:
        raise DataError(
            f"{corpus.source} has only one distinct character, "
            f"{format_chars(corpus.vocab.chars)}; there is nothing to learn: give a real text"
        )


def describe(corpus: Corpus) -> dict:
    """Returns JSON-able facts about a corpus for the run directory."""
    return {
        "source": corpus.source,
        "sha256": corpus.digest,
        "chars": int(len(corpus.ids)),
        "vocab_size": len(corpus.vocab),
    }
