"""Chapter 2, data sampling: a text corpus becomes fixed-length training windows, on `datasets`.

The book's chapter 2 (`GPTDatasetV1`) encodes the whole text and cuts it with a sliding window:

    for i in range(0, len(token_ids) - max_length, stride):
        input = token_ids[i : i + max_length];  target = token_ids[i + 1 : i + max_length + 1]

Here a window is `input_ids = labels = token_ids[i : i + length]`, for the same starts `i`. So `input_ids`
are the book's input rows exactly, and there are as many windows as the book makes. The labels are not
shifted: a transformers causal LM shifts them itself (logits at position t predict labels[t + 1]), so the
model is trained on the book's targets `target[:-1]`; the book's last target of each window,
`token_ids[i + length]`, is the one prediction per window left out. As in the book, a corpus needs at least
`length + 1` tokens; `stride == length` gives disjoint windows, a smaller stride overlapping ones.

A corpus is a list of documents (one per file, or the rows of a text column), tokenized one by one in a
batched `Dataset.map` (several processes with `num_proc`, cached by `datasets` for a corpus on disk) and
joined with `<|endoftext|>` between documents, which gives the ids of `eos.join(documents)`. The windows are
cut over the whole joined corpus, so they do not depend on how `map` batches it. A corpus larger than memory
streams: with `streaming=True` (or an `IterableDataset`) the windows come from a generator over the stream.

The train/validation split is the book's chapter 5 one: the first 90% of the characters for training, the
rest for validation, before windowing (windows of the two never share a token). `split_corpus(by="documents")`
shuffles whole documents with a seed instead.

`load_text_dataset` (files, `Dataset`, `IterableDataset`, Hub id) and `tokenize_dataset` keep other columns
such as labels, so the later chapters load and tokenize their data with them too (`classification.py`).
"""

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import (
    Dataset,
    DatasetDict,
    Features,
    IterableDataset,
    IterableDatasetDict,
    List,
    Value,
    load_dataset,
)
from transformers import PreTrainedTokenizerBase

from ..hub import is_local_path


__all__ = [
    "TextSource",
    "default_corpus",
    "load_text_dataset",
    "tokenize_dataset",
    "pretraining_windows",
    "split_corpus",
]

# What `load_text_dataset` reads: a file or folder path, a list of `Path`s, a list of texts (documents),
# a `Dataset` or `IterableDataset` with a text column, or a Hub dataset id.
TextSource = str | os.PathLike | Sequence[str] | Sequence[os.PathLike] | Dataset | IterableDataset


# ----------------------------------------------------------------------------------------------------------
# The corpus: documents from files, a dataset or the Hub


def default_corpus() -> list[str]:
    """A corpus that ships with Python: the language reference of `pydoc_data.topics`, one document per topic.

    About 465,000 characters of English (79 topics), more than 20 times the book's "The Verdict", so the
    pretraining recipe runs on a fresh machine with no download.
    """
    from pydoc_data.topics import topics

    return list(topics.values())


def load_text_dataset(
    source: TextSource,
    text_column: str = "text",
    *,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset | IterableDataset:
    """Load a corpus as a dataset with a text column, checking that the column is there.

    Args:
        source: a path (`str` or `Path`) of a text file or of a folder of `.txt` files, a list of `Path`s
            (each file one document), a list of `str` (the documents themselves, not file names), a `Dataset`
            or `IterableDataset`, or a Hub dataset id (a `str` that is no local path).
        text_column: the column holding the text; files and lists of texts get a column of this name.
        split: the split of a Hub dataset.
        streaming: return an `IterableDataset` that reads the corpus as it is iterated.
        cache_dir: where `datasets` caches files and Hub data (default: its own cache).
    """
    if isinstance(source, (DatasetDict, IterableDatasetDict)):
        raise ValueError(f"the corpus is a dict of splits {list(source)}: pass one split, e.g. corpus['train']")
    if isinstance(source, (Dataset, IterableDataset)):
        dataset = source
    elif isinstance(source, str) and not is_local_path(source):  # the project's one rule: see hub.py
        dataset = load_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)
    elif isinstance(source, (list, tuple)) and all(isinstance(item, str) for item in source):
        dataset = Dataset.from_dict({text_column: list(source)}, features=_text_features(text_column))
    else:
        files = _text_files(source)
        dataset = load_dataset(
            "text",
            data_files=[str(path) for path in files],
            sample_by="document",  # one row per file, its whole text (newlines read as Python's open() does)
            features=_text_features(text_column),
            split="train",
            streaming=streaming,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    if streaming and isinstance(dataset, Dataset):
        dataset = dataset.to_iterable_dataset()
    _check_text_column(dataset, text_column)
    return dataset


def _text_files(source: str | os.PathLike | Sequence[os.PathLike]) -> list[Path]:
    """The files of a corpus given as a file, a folder (its `.txt` files) or a list of `Path`s."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise FileNotFoundError(f"no .txt files in corpus folder {path}")
            return files
        source = [path]
    if not isinstance(source, (list, tuple)) or not all(isinstance(item, os.PathLike) for item in source):
        raise ValueError(
            "a corpus is a path, a list of Paths, a list of texts, a Dataset, an IterableDataset or a Hub id, "
            f"got {type(source).__name__}"
        )
    for path in source:
        if not Path(path).is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
    return [Path(path) for path in source]


def _text_features(text_column: str) -> Features:
    return Features({text_column: Value("string")})


def _check_text_column(dataset: Dataset | IterableDataset, text_column: str) -> None:
    """Fail early, with the column names, when the text column is missing, not text, or the corpus empty."""
    if dataset.column_names is not None and text_column not in dataset.column_names:
        raise ValueError(f"text column {text_column!r} not found; the corpus has columns {dataset.column_names}")
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError("the corpus is empty: it has no documents")
    feature = (dataset.features or {}).get(text_column)
    if isinstance(feature, Value) and feature.dtype not in ("string", "large_string"):
        raise ValueError(f"column {text_column!r} holds {feature.dtype}, not text")


# ----------------------------------------------------------------------------------------------------------
# Tokenizing and cutting windows


def tokenize_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_column: str = "text",
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Replace the text column by `input_ids`, one row per document, keeping the other columns (labels...).

    Runs as a batched `map`, in `num_proc` processes for a `Dataset` (a stream tokenizes as it is read);
    `datasets` caches the result of a dataset stored on disk. No special token is added.
    """
    _check_text_column(dataset, text_column)
    options = dict(num_proc=num_proc, desc="Tokenizing") if isinstance(dataset, Dataset) else {}
    return dataset.map(
        _tokenize_batch,
        batched=True,
        remove_columns=[text_column],
        fn_kwargs=dict(tokenizer=tokenizer, text_column=text_column),
        **options,
    )


def _tokenize_batch(batch: dict, tokenizer: PreTrainedTokenizerBase, text_column: str) -> dict:
    encoded = tokenizer(batch[text_column], add_special_tokens=False, return_attention_mask=False, verbose=False)
    return {"input_ids": encoded["input_ids"]}


def pretraining_windows(
    corpus: TextSource | DatasetDict | IterableDatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    stride: int | None = None,
    *,
    text_column: str = "text",
    num_proc: int | None = None,
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset | IterableDataset | DatasetDict | IterableDatasetDict:
    """The book's sliding windows over a corpus: rows of `input_ids` and `labels`, `length` ints each.

    Args:
        corpus: anything `load_text_dataset` reads, or a dict of splits (each split gets its own windows).
        tokenizer: its `eos_token` goes between documents.
        length: tokens per window (the book's `max_length`); at most the model's context length.
        stride: tokens between the starts of two windows; `length` (the default) for disjoint windows.
        num_proc: processes for tokenizing a `Dataset`.
        streaming: produce the windows lazily from a stream (an `IterableDataset`).

    Windows are `input_ids = labels = token_ids[i : i + length]` for `i` in the book's
    `range(0, len(token_ids) - length, stride)`: see the module docstring.
    """
    stride = length if stride is None else stride
    for name, value in (("length", length), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def windows_of(source: TextSource, where: str) -> Dataset | IterableDataset:
        dataset = load_text_dataset(source, text_column, streaming=streaming, cache_dir=cache_dir)
        documents = tokenize_dataset(dataset, tokenizer, text_column=text_column, num_proc=num_proc)
        return _cut_windows(documents.select_columns(["input_ids"]), length, stride, tokenizer.eos_token_id, where)

    if not isinstance(corpus, (DatasetDict, IterableDatasetDict)):
        return windows_of(corpus, "the corpus")
    windows = {name: windows_of(split, f"the {name!r} split") for name, split in corpus.items()}
    streamed = any(isinstance(split, IterableDataset) for split in windows.values())
    return IterableDatasetDict(windows) if streamed else DatasetDict(windows)


def _cut_windows(
    documents: Dataset | IterableDataset, length: int, stride: int, eos_id: int | None, where: str
) -> Dataset | IterableDataset:
    """Windows over tokenized documents: cut in memory with numpy, or by a generator over a stream."""
    ids = List(Value("int64"), length=length)  # int64: the loss wants long labels
    features = Features({"input_ids": ids, "labels": ids})
    if isinstance(documents, IterableDataset):
        options = dict(documents=documents, length=length, stride=stride, eos_id=eos_id, where=where)
        return IterableDataset.from_generator(_stream_windows, gen_kwargs=options, features=features)
    tokens = _joined_tokens(documents, eos_id)
    _check_enough_tokens(len(tokens), length, where)
    starts = np.arange(0, len(tokens) - length, stride)  # the book's range(0, len(token_ids) - max_length, stride)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, length)[starts]  # (windows, length)
    column = pa.FixedSizeListArray.from_arrays(pa.array(windows.reshape(-1)), length)
    return Dataset.from_dict({"input_ids": column, "labels": column}, features=features)


def _joined_tokens(documents: Dataset, eos_id: int | None) -> np.ndarray:
    """All documents' ids in one array with `eos_id` between consecutive documents: `eos.join(documents)`."""
    if eos_id is None and len(documents) > 1:
        raise ValueError("the tokenizer has no eos_token to put between documents")
    column = documents.with_format("arrow")["input_ids"]  # honours select/shuffle, unlike `documents.data`
    ids = pc.list_flatten(column).to_numpy().astype(np.int64)
    document_ends = np.cumsum(pc.list_value_length(column).to_numpy())[:-1]
    return ids if len(document_ends) == 0 else np.insert(ids, document_ends, eos_id)


def _stream_windows(
    documents: IterableDataset, length: int, stride: int, eos_id: int | None, where: str
) -> Iterator[dict]:
    """The same windows as in memory, from a rolling buffer over a stream of tokenized documents."""
    buffer: list[int] = []
    start = 0  # where the next window starts, in `buffer`; past its end while a long stride skips tokens
    seen_tokens = windows = 0
    for index, document in enumerate(documents):
        if index > 0:
            if eos_id is None:
                raise ValueError("the tokenizer has no eos_token to put between documents")
            buffer.append(eos_id)
        buffer.extend(document["input_ids"])
        seen_tokens += len(document["input_ids"]) + (index > 0)
        while len(buffer) - start > length:  # a window and the token after it, as the book's range end
            window = buffer[start : start + length]
            yield {"input_ids": window, "labels": window}
            windows += 1
            start += stride
        consumed = min(start, len(buffer))
        del buffer[:consumed]
        start -= consumed
    if windows == 0:
        _check_enough_tokens(seen_tokens, length, where)


def _check_enough_tokens(num_tokens: int, length: int, where: str) -> None:
    if num_tokens == 0:
        raise ValueError(f"{where} is empty: its documents hold no tokens")
    if num_tokens <= length:
        raise ValueError(
            f"{where} has {num_tokens} tokens, fewer than one window needs: {length + 1} "
            f"(length {length} + 1, as the book's GPTDatasetV1)"
        )


def split_corpus(
    corpus: TextSource,
    train_fraction: float = 0.9,
    *,
    by: Literal["characters", "documents"] = "characters",
    seed: int = 123,
    text_column: str = "text",
) -> DatasetDict:
    """Split a corpus into "train" and "validation" texts, before windowing.

    `by="characters"` is the book's chapter 5 split, deterministic: the first `int(train_fraction * n)` of
    the corpus' `n` characters train, the rest validate (the document holding the cut is cut in two).
    `by="documents"` shuffles whole documents with `seed` and keeps `train_fraction` of them for training.
    `corpus` is anything `load_text_dataset` reads but a stream; only the text column is kept.
    """
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be between 0 and 1, got {train_fraction!r}")
    dataset = load_text_dataset(corpus, text_column)
    if not isinstance(dataset, Dataset):
        raise ValueError("split_corpus cannot split a stream: give a streamed corpus its own validation corpus")
    dataset = dataset.select_columns([text_column])
    if by == "documents":
        if len(dataset) < 2:
            raise ValueError(f"cannot split {len(dataset)} document by documents; split by characters")
        parts = dataset.train_test_split(train_size=train_fraction, seed=seed)
        return DatasetDict(train=parts["train"], validation=parts["test"])
    if by != "characters":
        raise ValueError(f"by must be 'characters' or 'documents', got {by!r}")
    texts = dataset[text_column]
    cut = int(train_fraction * sum(len(text) for text in texts))  # the book: int(train_ratio * len(text_data))
    train, validation, seen = [], [], 0
    for text in texts:
        if seen + len(text) <= cut:
            train.append(text)
        elif seen >= cut:
            validation.append(text)
        else:
            train.append(text[: cut - seen])
            validation.append(text[cut - seen :])
        seen += len(text)
    features = _text_features(text_column)
    return DatasetDict(
        train=Dataset.from_dict({text_column: train}, features=features),
        validation=Dataset.from_dict({text_column: validation}, features=features),
    )
