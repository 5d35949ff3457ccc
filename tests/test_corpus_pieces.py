"""Chapter 2 past memory: a corpus read lazily, in pieces that tokenize as the whole text, and chapter 5's split."""

from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from hf_scratchgpt.data import corpus_pieces
from hf_scratchgpt.data.corpus_pieces import CorpusPart
from hf_scratchgpt.data.pretraining import corpus_parts, pretraining_windows, split_corpus

pytestmark = pytest.mark.usefixtures("small_pieces")  # pieces of 2,048 characters


def book_character_split(documents: list[str], fraction: float) -> dict[str, list[str]]:
    """The book's chapter 5 cut at int(fraction * characters), over documents: the one holding it cut in two."""
    cut = int(fraction * sum(map(len, documents)))
    train, validation, seen = [], [], 0
    for text in documents:
        if seen + len(text) <= cut:
            train.append(text)
        elif seen >= cut:
            validation.append(text)
        else:
            train.append(text[: cut - seen])
            validation.append(text[cut - seen :])
        seen += len(text)
    return {"train": train, "validation": validation}


def test_a_long_document_is_cut_where_gpt2_splits_too(tiktoken_gpt2, long_file):
    text = long_file.read_text(encoding="utf-8")
    pieces = [piece["text"] for piece in CorpusPart((long_file,)).pieces()]
    assert len(pieces) > 20 and "".join(pieces) == text
    assert all(len(piece) <= 2 * corpus_pieces.PIECE_CHARS for piece in pieces)
    assert all(piece[0] in " \n" and not previous[-1].isspace() for previous, piece in zip(pieces, pieces[1:]))
    assert sum((tiktoken_gpt2.encode(piece) for piece in pieces), []) == tiktoken_gpt2.encode(text)


def test_a_piece_without_a_place_to_cut_in_reach_ends_at_the_next_one(tmp_path):
    path = tmp_path / "long-word.txt"
    path.write_text("x" * (10 * 2048) + " end")
    assert [piece["text"] for piece in CorpusPart((path,)).pieces()] == ["x" * (10 * 2048), " end"]


def test_text_with_no_place_to_cut_is_cut_anyway_and_loses_nothing(tmp_path):
    path = tmp_path / "no-spaces.txt"
    path.write_text("x" * (70 * 2048))
    pieces = [piece["text"] for piece in CorpusPart((path,)).pieces()]
    assert "".join(pieces) == path.read_text() and len(pieces) > 1 and max(map(len, pieces)) < 64 * 2048


def test_pieces_mark_where_each_document_after_the_first_starts(tmp_path):
    for name, text in (("a.txt", "first"), ("b.txt", ""), ("c.txt", "third " * 1000)):
        (tmp_path / name).write_text(text)
    pieces = list(CorpusPart(tuple(sorted(tmp_path.glob("*.txt")))).pieces())
    assert [piece["new_document"] for piece in pieces] == [False, True, True] + [False] * (len(pieces) - 3)
    assert pieces[1]["text"] == "" and "".join(piece["text"] for piece in pieces) == "first" + "third " * 1000


@pytest.mark.parametrize("by", ["characters", "documents"])
def test_the_split_of_files_read_in_pieces_is_the_books(gpt2, tiktoken_gpt2, verdict, long_file, tmp_path, by):
    documents = [verdict, "", long_file.read_text(encoding="utf-8"), "a last short document"]
    for index, text in enumerate(documents):
        (tmp_path / f"{index}.txt").write_text(text, encoding="utf-8")
    if by == "characters":
        expected = book_character_split(documents, 0.7)
    else:
        shuffled = Dataset.from_dict({"text": documents}).train_test_split(train_size=0.7, seed=3)
        expected = {"train": shuffled["train"]["text"][:], "validation": shuffled["test"]["text"][:]}
    texts = split_corpus(tmp_path, 0.7, by=by, seed=3)
    assert {side: texts[side]["text"][:] for side in expected} == expected
    windows = pretraining_windows(corpus_parts(tmp_path, 0.7, by=by, seed=3), gpt2, 40, cache_dir=tmp_path / "c")
    for side in ("train", "validation"):
        ids = tiktoken_gpt2.encode("<|endoftext|>".join(expected[side]), allowed_special="all")
        got = [np.asarray(row["input_ids"]).tolist() for row in windows[side]]
        assert got == [ids[start : start + 40] for start in range(0, len(ids) - 40, 40)], side


def test_a_changed_file_changes_the_fingerprint(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("some text")
    before = CorpusPart((path,)).fingerprint()
    assert CorpusPart((path,)).fingerprint() == before
    path.write_text("other text, longer")
    assert CorpusPart((path,)).fingerprint() != before
    assert CorpusPart((path,), split=("characters", 0.9, 1, "train")).fingerprint() != CorpusPart((path,)).fingerprint()


def test_a_stream_cannot_be_split_by_characters(verdict):
    parts = corpus_parts(Dataset.from_dict({"text": [verdict]}).to_iterable_dataset(), 0.9)
    with pytest.raises(ValueError, match="a stream cannot be split by characters"):
        list(parts["validation"].pieces())


@pytest.fixture(scope="module")
def verdict(shared_data: Path) -> str:
    return (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
