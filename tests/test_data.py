import json
import subprocess
import sys

import numpy as np
import pytest

from charrnn_keras import corpus as corpus_lib
from charrnn_keras import data as data_lib
from charrnn_keras.data import DataError
from charrnn_keras.vocab import Vocab, VocabError

BOM = "\ufeff".encode()  # what Windows editors put at the start of a UTF-8 file


def test_stream_layout_continues_each_row():
    ids = np.arange(1000, dtype=np.uint16)
    x, y = data_lib.stream_batches(ids, batch_size=3, seq_length=5)
    num_batches = 999 // 15
    assert x.shape == y.shape == (num_batches, 3, 5)
    np.testing.assert_array_equal(y, x + 1)  # targets are the next character
    # Row i of batch k+1 starts right where row i of batch k ended.
    np.testing.assert_array_equal(x[1:, :, 0], x[:-1, :, -1] + 1)
    # Each row, read across batches, is one contiguous stretch of the text.
    for i in range(3):
        row = x[:, i, :].reshape(-1)
        np.testing.assert_array_equal(row, np.arange(row[0], row[0] + len(row)))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_dataset_yields_the_layout_in_order(dtype):
    ids = (np.arange(203) * 7 % 251).astype(dtype)
    ds, n = data_lib.make_dataset(ids, batch_size=2, seq_length=4)
    assert ds.element_spec[0].shape == (2, 4)  # static: the stateful model needs it
    batches = [(a.numpy(), b.numpy()) for a, b in ds]
    assert len(batches) == n == 202 // 8
    x, y = data_lib.stream_batches(ids, 2, 4)
    for k, (a, b) in enumerate(batches):
        assert a.dtype == np.int32
        np.testing.assert_array_equal(a, x[k])
        np.testing.assert_array_equal(b, y[k])
    # Row 0 reads the text straight on: ids[0:4] in batch 0, ids[4:8] in batch 1.
    np.testing.assert_array_equal(batches[1][0][0], ids[4:8])


def test_dataset_runs_without_autotuning():
    """No tf.data autotuning: on 2 cores its tuning stalled epoch starts for seconds
    (BENCHMARKS.md, "Time between steps")."""
    ds, _ = data_lib.make_dataset(np.arange(400) % 7, batch_size=4, seq_length=5, replicas=2)
    assert ds.options().autotune.enabled is False


def test_vocab_json_round_trip(tmp_path):
    vocab, ids = Vocab.from_codepoints(np.array([ord(c) for c in "héllo wörld\n"]))
    path = tmp_path / "vocab.json"
    vocab.save(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["chars"] == sorted(set("héllo wörld\n"))
    again = Vocab.load(path)
    assert again == vocab and again.counts == vocab.counts
    assert again.decode(ids) == "héllo wörld\n"
    assert again.most_frequent() == "l"


def test_vocab_unknown_characters_are_named():
    vocab = Vocab(list("abc"))
    with pytest.raises(VocabError, match=r"'z' \(U\+007A\)"):
        vocab.encode("abz")


def test_damaged_vocab_names_the_file(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text('{"chars": ["a", "b"')
    with pytest.raises(VocabError, match="vocab.json is damaged"):
        Vocab.load(path)


def test_corpus_too_small_says_how_many(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("abcdefghij" * 10)
    corpus = corpus_lib.load_corpus(str(path), 10**6, None)
    with pytest.raises(DataError) as e:
        data_lib.check_size(len(corpus.ids), 4, 16, 0.1)
    assert "corpus has 100 characters" in str(e.value)
    assert f"needs at least {data_lib.min_chars(4, 16, 0.1):,}" in str(e.value)


def test_min_chars_is_exactly_enough():
    for batch, seq, frac in [(4, 8, 0.2), (3, 5, 0.1), (2, 3, 0.0), (60, 50, 0.1)]:
        need = data_lib.min_chars(batch, seq, frac)
        data_lib.check_size(need, batch, seq, frac)  # does not raise
        train, val = data_lib.split(np.zeros(need), frac)
        data_lib.stream_batches(train, batch, seq)
        if frac:
            data_lib.stream_batches(val, batch, seq)


def test_non_utf8_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"plain text, then caf" + "é".encode("latin-1") + b" more")
    with pytest.raises(DataError) as e:
        corpus_lib.load_corpus(str(path), 10**6, None)
    assert str(path) in str(e.value)
    assert "byte offset 20" in str(e.value)


def test_validation_is_the_end_of_the_text():
    ids = np.arange(100)
    train, val = data_lib.split(ids, 0.1)
    np.testing.assert_array_equal(val, np.arange(90, 100))
    np.testing.assert_array_equal(train, np.arange(90))


def test_encoded_corpus_is_cached_by_content(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox\n" * 50)
    cache = tmp_path / "cache"
    first = corpus_lib.load_corpus(str(path), 10**6, cache)
    assert len(list(cache.glob("*.npy"))) == 1

    def no_decoding(*args):
        raise AssertionError("the cached corpus was encoded again")

    monkeypatch.setattr(corpus_lib, "_decode", no_decoding)
    second = corpus_lib.load_corpus(str(path), 10**6, cache)
    np.testing.assert_array_equal(first.ids, second.ids)
    assert first.vocab == second.vocab
    path.write_text("different text\n" * 50)  # new content: a new key, so it is encoded
    with pytest.raises(AssertionError, match="encoded again"):
        corpus_lib.load_corpus(str(path), 10**6, cache)


def test_directory_corpus_reads_files_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    corpus = corpus_lib.load_corpus(str(tmp_path), 10**6, None)
    assert corpus.vocab.decode(corpus.ids) == "first\nsecond"


def test_builtin_corpus_is_deterministic_and_capped():
    raw1, source = corpus_lib.read_raw(None, 50_000)
    raw2, _ = corpus_lib.read_raw(None, 50_000)
    assert source == corpus_lib.BUILTIN
    assert raw1 == raw2
    assert len(raw1.decode("utf-8")) == 50_000
    assert b"def " in raw1  # it is Python source


def test_ascii_fast_path_encodes_like_the_general_one():
    text = b"to be, or not to be: that is the question.\n" * 7
    raw = np.frombuffer(text, dtype=np.uint8)
    fast_vocab, fast_ids = Vocab.from_codepoints(raw)
    slow_vocab, slow_ids = Vocab.from_codepoints(raw.astype(np.int64))
    assert fast_vocab == slow_vocab and fast_vocab.counts == slow_vocab.counts
    assert fast_ids.dtype == np.uint8
    np.testing.assert_array_equal(fast_ids, slow_ids)
    assert fast_vocab.decode(fast_ids) == text.decode()


def test_byte_order_mark_is_stripped_and_logged(tmp_path, caplog):
    path = tmp_path / "bom.txt"
    path.write_bytes(BOM + b"plain ascii text\n" * 20)
    with caplog.at_level("INFO", logger="charrnn_keras.corpus"):
        corpus = corpus_lib.load_corpus(str(path), 10**6, None)
    assert "\ufeff" not in corpus.vocab.chars
    assert corpus.vocab.decode(corpus.ids) == "plain ascii text\n" * 20
    assert corpus.ids.dtype == np.uint8  # ASCII after the mark: still the one-byte fast path
    assert f"{path}: stripped the UTF-8 byte-order mark" in caplog.text


def test_byte_order_mark_is_stripped_from_each_file_of_a_directory(tmp_path):
    (tmp_path / "a.txt").write_bytes(BOM + "first café".encode())
    (tmp_path / "b.txt").write_bytes(BOM + b"second")
    (tmp_path / "c.txt").write_bytes(b"third \xef\xbb\xbf inside")  # not at the start: text
    corpus = corpus_lib.load_corpus(str(tmp_path), 10**6, None)
    assert corpus.vocab.decode(corpus.ids) == "first café\nsecond\nthird \ufeff inside"


def test_cache_temporaries_of_killed_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    cache = tmp_path / "cache"
    cache.mkdir()
    left = cache / f".0123456789abcdef.npy.tmp{int(dead.stdout)}"
    left.write_bytes(b"half an array")
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox\n" * 50)
    corpus_lib.load_corpus(str(path), 10**6, cache)
    assert not left.exists()
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".npy"]
