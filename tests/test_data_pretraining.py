"""Chapter 2, data sampling: the book's sliding windows on `datasets`, corpus loading, and chapter 5's split."""

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import default_data_collator

from hf_scratchgpt.data.classification import load_sms_spam
from hf_scratchgpt.data.pretraining import (
    TokenWindows,
    default_corpus,
    load_text_dataset,
    pretraining_windows,
    split_corpus,
    tokenize_dataset,
)


class GPTDatasetV1:
    """The book's chapter 2 dataset, as printed there (lists instead of tensors)."""

    def __init__(self, txt, tokenizer, max_length, stride):
        self.input_ids = []
        self.target_ids = []
        token_ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
        for i in range(0, len(token_ids) - max_length, stride):
            input_chunk = token_ids[i : i + max_length]
            target_chunk = token_ids[i + 1 : i + max_length + 1]
            self.input_ids.append(input_chunk)
            self.target_ids.append(target_chunk)


def ids(row) -> list[int]:
    return np.asarray(row).tolist()  # a TokenWindows row holds numpy arrays, a stream's row lists


def assert_book_windows(windows, book: GPTDatasetV1) -> None:
    """input_ids are the book's inputs; labels are input_ids, whose shift gives the book's targets but the last."""
    rows = [{key: ids(value) for key, value in row.items()} for row in windows]
    assert [row["input_ids"] for row in rows] == book.input_ids
    assert all(row["labels"] == row["input_ids"] for row in rows)
    assert [row["labels"][1:] for row in rows] == [target[:-1] for target in book.target_ids]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def verdict(shared_data: Path) -> str:
    return (shared_data / "the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sms_texts(shared_data: Path) -> list[str]:
    return load_sms_spam(shared_data / "sms_spam" / "SMSSpamCollection.tsv")["text"][:]


# ----------------------------------------------------------------------------------------------------------
# Windows: the book's GPTDatasetV1


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streaming"])
@pytest.mark.parametrize("length, stride", [(4, 4), (4, 1), (256, 256), (256, 128), (7, 10), (1, 1)])
def test_windows_are_the_books(gpt2, tiktoken_gpt2, verdict, shared_data, length, stride, streaming):
    windows = pretraining_windows(shared_data / "the-verdict.txt", gpt2, length, stride, streaming=streaming)
    assert isinstance(windows, IterableDataset if streaming else TokenWindows)
    assert_book_windows(windows, GPTDatasetV1(verdict, tiktoken_gpt2, max_length=length, stride=stride))


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streaming"])
def test_documents_are_joined_with_eos_across_map_batches(gpt2, tiktoken_gpt2, sms_texts, streaming):
    # 5,574 documents, more than the 1,000 of one map batch, and one empty document.
    documents = sms_texts[:3000] + [""] + sms_texts[3000:]
    corpus = Dataset.from_dict({"text": documents})
    windows = pretraining_windows(corpus, gpt2, length=32, stride=24, streaming=streaming)
    book = GPTDatasetV1("<|endoftext|>".join(documents), tiktoken_gpt2, max_length=32, stride=24)
    assert_book_windows(windows, book)


def test_windows_with_several_processes(gpt2, tiktoken_gpt2, sms_texts):
    windows = pretraining_windows(sms_texts, gpt2, length=64, stride=64, num_proc=2)
    book = GPTDatasetV1("<|endoftext|>".join(sms_texts), tiktoken_gpt2, max_length=64, stride=64)
    assert_book_windows(windows, book)


def test_windows_of_selected_rows(gpt2, tiktoken_gpt2, sms_texts):
    corpus = Dataset.from_dict({"text": sms_texts}).shuffle(seed=0).select(range(500))
    windows = pretraining_windows(corpus, gpt2, length=16, stride=8)
    book = GPTDatasetV1("<|endoftext|>".join(corpus["text"]), tiktoken_gpt2, max_length=16, stride=8)
    assert_book_windows(windows, book)


def test_disjoint_windows_tile_the_tokens(gpt2, verdict):
    windows = pretraining_windows([verdict], gpt2, length=100)  # stride defaults to length
    tokens = gpt2.encode(verdict)
    assert sum((ids(row["input_ids"]) for row in windows), []) == tokens[: len(windows) * 100]
    assert len(windows) == (len(tokens) - 1) // 100


def test_windows_batch_with_the_default_collator(gpt2, verdict):
    windows = pretraining_windows([verdict], gpt2, length=32)
    row = windows[0]
    assert row["input_ids"].dtype == np.int64 and row["input_ids"].shape == (32,)
    batch = default_data_collator([windows[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 32)
    assert batch["labels"].dtype == torch.long  # cross-entropy needs long targets
    assert torch.equal(batch["input_ids"], batch["labels"])


def test_split_windows_keep_their_split_names(gpt2, verdict):
    windows = pretraining_windows(split_corpus([verdict]), gpt2, length=64)
    assert set(windows) == {"train", "validation"}
    assert len(windows["train"]) > 5 * len(windows["validation"]) > 0


# ----------------------------------------------------------------------------------------------------------
# The corpus


def test_files_load_one_document_each_with_their_exact_text(shared_data, tmp_path):
    (tmp_path / "a.txt").write_text("first\n\n  document\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second 👍 document", encoding="utf-8")
    verdict = shared_data / "the-verdict.txt"
    corpus = load_text_dataset([verdict, tmp_path / "b.txt"])
    assert corpus["text"][:] == [verdict.read_text(encoding="utf-8"), "second 👍 document"]
    folder = load_text_dataset(tmp_path, text_column="content")
    assert folder.column_names == ["content"]
    assert folder["content"][:] == ["first\n\n  document\n", "second 👍 document"]


def test_files_stream(tmp_path):
    (tmp_path / "a.txt").write_text("streamed text", encoding="utf-8")
    corpus = load_text_dataset(tmp_path / "a.txt", streaming=True)
    assert isinstance(corpus, IterableDataset)
    assert list(corpus) == [{"text": "streamed text"}]


def test_tokenizing_the_sms_file_in_two_processes(gpt2, shared_data):
    messages = load_sms_spam(shared_data / "sms_spam" / "SMSSpamCollection.tsv")
    assert len(messages) == 5574  # README: 5,574 messages
    one = tokenize_dataset(messages, gpt2, num_proc=1)
    two = tokenize_dataset(messages, gpt2, num_proc=2)
    assert one.column_names == two.column_names == ["label", "input_ids"]
    assert two["input_ids"][:] == one["input_ids"][:]
    assert two["label"][:] == messages["label"][:]
    assert one["input_ids"][10] == gpt2.encode(messages["text"][10])


def test_tokenizing_files_is_cached(gpt2, shared_data, tmp_path):
    corpus = load_text_dataset(shared_data / "the-verdict.txt", cache_dir=tmp_path)
    first = tokenize_dataset(corpus, gpt2)
    second = tokenize_dataset(corpus, gpt2)
    assert first.cache_files and Path(first.cache_files[0]["filename"]).is_relative_to(tmp_path)
    assert second.cache_files == first.cache_files


def test_default_corpus_is_pythons_language_reference(gpt2):
    documents = default_corpus()
    assert len(documents) > 50 and all(isinstance(document, str) and document for document in documents)
    assert sum(map(len, documents)) > 400_000
    assert any("lambda" in document for document in documents)
    windows = pretraining_windows(split_corpus(documents), gpt2, length=256)
    assert len(windows["train"]) > 100 and len(windows["validation"]) > 5


# ----------------------------------------------------------------------------------------------------------
# Train / validation split


def test_character_split_is_the_books(verdict):
    splits = split_corpus([verdict], train_fraction=0.9)
    split_idx = int(0.90 * len(verdict))  # the book's chapter 5
    assert splits["train"]["text"][:] == [verdict[:split_idx]]
    assert splits["validation"]["text"][:] == [verdict[split_idx:]]


def test_character_split_of_several_documents(sms_texts):
    documents = sms_texts[:100]
    splits = split_corpus(documents, train_fraction=0.7)
    train, validation = splits["train"]["text"][:], splits["validation"]["text"][:]
    assert len("".join(train)) == int(0.7 * len("".join(documents)))
    assert "".join(train + validation) == "".join(documents)
    cut = len(train) - 1  # the document holding the cut is in both, in two pieces
    assert train[:cut] == documents[:cut] and validation[1:] == documents[cut + 1 :]
    assert train[cut] + validation[0] == documents[cut]


def test_document_split_is_reproducible_with_a_seed(sms_texts):
    documents = sms_texts[:200]
    first = split_corpus(documents, 0.8, by="documents", seed=1)
    again = split_corpus(documents, 0.8, by="documents", seed=1)
    other = split_corpus(documents, 0.8, by="documents", seed=2)
    assert first["train"]["text"][:] == again["train"]["text"][:]
    assert first["train"]["text"][:] != other["train"]["text"][:]
    assert len(first["train"]) == 160 and len(first["validation"]) == 40
    assert sorted(first["train"]["text"][:] + first["validation"]["text"][:]) == sorted(documents)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_split_fraction_must_be_between_0_and_1(fraction):
    with pytest.raises(ValueError, match="train_fraction") as error:
        split_corpus(["some text"], fraction)
    assert str(fraction) in one_line(error)


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear line


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streaming"])
@pytest.mark.parametrize("corpus", [[""], ["", ""]], ids=["empty_text", "empty_texts"])
def test_a_corpus_without_tokens(gpt2, corpus, streaming):
    with pytest.raises(ValueError, match="fewer than one window|no tokens|empty"):
        list(pretraining_windows(corpus, gpt2, length=4, streaming=streaming))


def test_a_corpus_without_documents(gpt2):
    with pytest.raises(ValueError, match="empty") as error:
        pretraining_windows(Dataset.from_dict({"text": []}), gpt2, length=4)
    one_line(error)


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streaming"])
def test_a_corpus_shorter_than_one_window(gpt2, streaming):
    text = "A short corpus of a few tokens."
    num_tokens = len(gpt2.encode(text))
    with pytest.raises(ValueError) as error:
        list(pretraining_windows([text], gpt2, length=num_tokens, streaming=streaming))
    message = one_line(error)
    assert f"has {num_tokens} tokens" in message and f"needs: {num_tokens + 1}" in message


def test_a_short_split_is_named(gpt2, verdict):
    with pytest.raises(ValueError, match="^the 'validation' split has"):
        pretraining_windows(split_corpus([verdict], train_fraction=0.99), gpt2, length=256)


@pytest.mark.parametrize("stride", [0, -1, 1.5])
def test_stride_must_be_positive(gpt2, stride):
    with pytest.raises(ValueError, match="stride must be a positive integer") as error:
        pretraining_windows(["some text"], gpt2, length=4, stride=stride)
    assert repr(stride) in one_line(error)


def test_length_must_be_positive(gpt2):
    with pytest.raises(ValueError, match="length must be a positive integer, got 0"):
        pretraining_windows(["some text"], gpt2, length=0)


def test_a_missing_text_column_names_the_columns(gpt2):
    corpus = Dataset.from_dict({"content": ["a"], "label": [0]})
    with pytest.raises(ValueError) as error:
        pretraining_windows(corpus, gpt2, length=4)
    message = one_line(error)
    assert "'text'" in message and "['content', 'label']" in message


def test_a_text_column_that_is_not_text():
    with pytest.raises(ValueError, match="'label' holds int64"):
        load_text_dataset(Dataset.from_dict({"text": ["a"], "label": [0]}), text_column="label")


def test_a_missing_file_is_named(gpt2, tmp_path):
    missing = tmp_path / "missing-corpus.txt"
    for source in (missing, str(missing), [missing], "missing-corpus.txt"):
        with pytest.raises(FileNotFoundError, match="missing-corpus.txt"):
            pretraining_windows(source, gpt2, length=4)
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        load_text_dataset(tmp_path)


@pytest.mark.parametrize("num_proc", [None, 2])
def test_a_file_that_is_not_utf8_is_named(gpt2, tmp_path, num_proc):
    latin = tmp_path / "latin-1.txt"
    latin.write_bytes("plain words first, then caf\u00e9 in Latin-1".encode("latin-1"))
    with pytest.raises(ValueError) as error:
        pretraining_windows(latin, gpt2, length=4, num_proc=num_proc, cache_dir=tmp_path / "cache")
    message = one_line(error)
    assert str(latin) in message and "not UTF-8" in message and "0xe9" in message
