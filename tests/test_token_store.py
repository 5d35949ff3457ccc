"""Chapter 2 past memory: token ids stored once on disk, windows sliced from the memory map, streamed windows."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from hf_scratchgpt.data import token_store as store_module
from hf_scratchgpt.data.pretraining import corpus_parts, pretraining_windows
from hf_scratchgpt.data.token_store import TokenWindows, token_dtype
from hf_scratchgpt.tokenization import train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("small_pieces")  # small files cross every boundary the real sizes have


@pytest.fixture(scope="module")
def verdict(shared_data: Path) -> str:
    return (shared_data / "the-verdict.txt").read_text(encoding="utf-8")


def rows(windows, count=None) -> list[list[int]]:
    """The first `count` windows' input_ids (all without a count), as lists."""
    chosen = windows if count is None else (row for _, row in zip(range(count), windows))
    return [np.asarray(row["input_ids"]).tolist() for row in chosen]


def test_ids_take_the_smallest_type_that_holds_the_vocabulary(gpt2, verdict, tmp_path):
    assert (token_dtype(50_257), token_dtype(65_536), token_dtype(65_537)) == (np.uint16, np.uint16, np.uint32)
    windows = pretraining_windows([verdict], gpt2, length=64, cache_dir=tmp_path)
    assert windows.store.tokens.features["input_ids"].feature.dtype == "uint16"
    assert windows[0]["input_ids"].dtype == np.int64  # the loss wants long labels


def test_the_stored_ids_of_a_long_document_are_those_of_the_whole(gpt2, tiktoken_gpt2, long_file, tmp_path):
    text = long_file.read_text(encoding="utf-8")
    windows = pretraining_windows(long_file, gpt2, length=50, stride=37, cache_dir=tmp_path)
    ids = tiktoken_gpt2.encode(text)
    assert windows.store.num_tokens == len(ids)
    assert rows(windows) == [ids[start : start + 50] for start in range(0, len(ids) - 50, 37)]


def test_windows_are_views_of_the_memory_map_and_not_pickled(gpt2, long_file, tmp_path):
    windows = pretraining_windows(long_file, gpt2, length=64, cache_dir=tmp_path)
    first = windows[len(windows) // 2]
    stored = windows._arrays  # filled by the first read: one read-only array per record batch of the files
    assert len(stored) > 1 and all(not array.flags.owndata and not array.flags.writeable for array in stored)
    assert all(Path(file["filename"]).parent == windows.store.path for file in windows.store.tokens.cache_files)
    copy = pickle.loads(pickle.dumps(windows))  # what a DataLoader worker gets
    assert len(pickle.dumps(windows)) < 10_000 < windows.store.num_tokens * 2
    assert np.array_equal(copy[len(windows) // 2]["input_ids"], first["input_ids"])


def test_a_rerun_tokenizes_nothing(gpt2, long_file, tmp_path, monkeypatch):
    first = pretraining_windows(long_file, gpt2, length=64, cache_dir=tmp_path)
    assert not first.store.reused

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(store_module, "_tokenize_pieces", fail)
    again = pretraining_windows(long_file, gpt2, length=64, cache_dir=tmp_path)
    assert again.store.reused and again.store.path == first.store.path
    assert rows(again) == rows(first)
    # Another context cuts other windows from the same ids: nothing to tokenize either.
    shorter = pretraining_windows(long_file, gpt2, length=16, stride=8, cache_dir=tmp_path)
    assert shorter.store.path == first.store.path
    assert rows(shorter, 3) == [rows(first, 1)[0][start : start + 16] for start in (0, 8, 16)]


def test_a_changed_tokenizer_or_corpus_is_a_miss(gpt2, verdict, long_file, tmp_path):
    first = pretraining_windows(long_file, gpt2, length=64, cache_dir=tmp_path)
    bpe = train_bpe_tokenizer([verdict], 300)
    other = pretraining_windows(long_file, bpe, length=64, cache_dir=tmp_path)
    assert not other.store.reused and other.store.path != first.store.path
    assert rows(other, 1)[0] == bpe.encode(long_file.read_text())[:64]
    edited = tmp_path / "edited.txt"
    edited.write_text(long_file.read_text() + " more")
    assert not pretraining_windows(edited, gpt2, length=64, cache_dir=tmp_path).store.reused
    assert not pretraining_windows([verdict], gpt2, length=64, cache_dir=tmp_path).store.reused


@pytest.mark.parametrize("num_proc", [None, 2])
def test_streaming_gives_the_windows_of_the_stored_ids(gpt2, long_file, tmp_path, num_proc):
    stored = pretraining_windows(long_file, gpt2, length=64, stride=48, cache_dir=tmp_path, num_proc=num_proc)
    streamed = pretraining_windows(long_file, gpt2, length=64, stride=48, streaming=True)
    assert rows(streamed) == rows(stored)


def test_the_stores_of_the_two_sides_differ(gpt2, verdict, tmp_path):
    windows = pretraining_windows(corpus_parts([verdict], 0.9), gpt2, 32, cache_dir=tmp_path)
    assert windows["train"].store.path != windows["validation"].store.path
    assert isinstance(windows["train"], TokenWindows)


def test_a_tokenizer_without_eos_cannot_join_documents(gpt2, tmp_path):
    tokenizer = train_bpe_tokenizer(["a few words to train on"] * 5, 270)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no eos_token to put between documents"):
        pretraining_windows(["first document", "second document"], tokenizer, 2, cache_dir=tmp_path)


def test_texts_in_memory_stream_with_the_split_of_the_stored_windows(gpt2, verdict, tmp_path):
    parts = corpus_parts([verdict, verdict.upper()], 0.8, streaming=True)
    streamed = pretraining_windows(parts, gpt2, 32, streaming=True)
    stored = pretraining_windows(parts, gpt2, 32, cache_dir=tmp_path)
    for side in ("train", "validation"):
        assert rows(streamed[side]) == rows(stored[side])


def test_an_unfinished_store_is_built_again(gpt2, verdict, tmp_path):
    windows = pretraining_windows([verdict], gpt2, 32, cache_dir=tmp_path)
    (windows.store.path / store_module.MANIFEST).unlink()  # as if the process that wrote it had died
    del windows
    again = pretraining_windows([verdict], gpt2, 32, cache_dir=tmp_path)
    assert not again.store.reused and len(again) > 100
