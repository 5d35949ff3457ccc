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

A corpus is a list of documents (one per file, or the rows of a text column), joined with `<|endoftext|>`
between documents, which gives the ids of `eos.join(documents)`. It is read in pieces, tokenized once in a
batched `Dataset.map` (several processes with `num_proc`) into token ids on disk, and the windows are sliced from
those ids when asked for (`token_store.py`): they do not depend on how the text was cut or batched, and a
second run on the same corpus and tokenizer tokenizes nothing. With `streaming=True` (or an `IterableDataset`)
the windows come from a generator over the stream instead, and nothing is stored.

The train/validation split is the book's chapter 5 one: the first 90% of the characters for training, the
rest for validation, before windowing (windows of the two never share a token). `by="documents"` shuffles whole
documents with a seed instead. `split_corpus` gives the two sides as texts in memory; `corpus_parts` gives them as
`CorpusPart`s, read lazily, for a corpus of any size.

`load_text_dataset` (files, `Dataset`, `IterableDataset`, Hub id) and `tokenize_dataset` keep other columns
such as labels, so the later chapters load and tokenize their data with them too (`classification.py`).
"""

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from datasets import (
    Dataset,
    DatasetDict,
    Features,
    IterableDataset,
    IterableDatasetDict,
    Value,
    load_dataset,
)
from transformers import PreTrainedTokenizerBase

from ..hub import is_local_path
from .corpus_pieces import CorpusPart
from .token_store import TokenWindows, stream_windows, token_store


__all__ = [
    "TextSource",
    "CorpusPart",
    "TokenWindows",
    "corpus_parts",
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


def corpus_parts(
    corpus: TextSource,
    train_fraction: float | None = None,
    *,
    by: Literal["characters", "documents"] = "characters",
    seed: int = 123,
    text_column: str = "text",
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> CorpusPart | dict[str, CorpusPart]:
    """A corpus as it will be read, nothing read yet: one `CorpusPart`, or "train" and "validation" parts.

    Files are read in pieces from disk (never whole); anything else through `load_text_dataset`, `streaming`
    applying to a Hub dataset. With a `train_fraction`, the parts are the two sides of `split_corpus`'s split
    (`by`, `seed`).
    """
    if train_fraction is not None and not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be between 0 and 1, got {train_fraction!r}")
    if by not in ("characters", "documents"):
        raise ValueError(f"by must be 'characters' or 'documents', got {by!r}")
    if isinstance(corpus, (str, os.PathLike)) and is_local_path(corpus) or _is_path_list(corpus):
        documents = tuple(_text_files(corpus))
    else:
        stream = streaming and isinstance(corpus, str)  # a Hub dataset; texts in memory stay a splittable Dataset
        documents = load_text_dataset(corpus, text_column, split=split, streaming=stream, cache_dir=cache_dir)
    if train_fraction is None:
        return CorpusPart(documents, text_column)
    sides = ("train", "validation")
    return {side: CorpusPart(documents, text_column, (by, train_fraction, seed, side)) for side in sides}


def _is_path_list(corpus) -> bool:
    return isinstance(corpus, (list, tuple)) and bool(corpus) and all(isinstance(item, os.PathLike) for item in corpus)


def pretraining_windows(
    corpus: TextSource | CorpusPart | DatasetDict | IterableDatasetDict | dict[str, CorpusPart],
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    stride: int | None = None,
    *,
    text_column: str = "text",
    num_proc: int | None = None,
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> TokenWindows | IterableDataset | dict[str, TokenWindows | IterableDataset]:
    """The book's sliding windows over a corpus: rows of `input_ids` and `labels`, `length` ids each.

    Args:
        corpus: anything `load_text_dataset` reads, a `CorpusPart`, or a dict of splits (each gets its windows).
        tokenizer: its `eos_token` goes between documents.
        length: tokens per window (the book's `max_length`); at most the model's context length.
        stride: tokens between the starts of two windows; `length` (the default) for disjoint windows.
        num_proc: processes for tokenizing.
        streaming: cut the windows while the corpus is read (an `IterableDataset`), storing nothing.
        cache_dir: where the token ids are stored (default: `datasets`' cache); see `token_store`.

    Windows are `input_ids = labels = token_ids[i : i + length]` for `i` in the book's
    `range(0, len(token_ids) - length, stride)`: see the module docstring. Without streaming they are a
    `TokenWindows`, read from token ids on disk that are tokenized once and reused by later calls.
    """
    stride = length if stride is None else stride
    for name, value in (("length", length), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def windows_of(part: CorpusPart) -> TokenWindows | IterableDataset:
        if streaming or isinstance(part.documents, IterableDataset):
            return stream_windows(part, tokenizer, length, stride)
        store = token_store(part, tokenizer, num_proc=num_proc, cache_dir=cache_dir)
        return TokenWindows(store, length, stride, part.name)

    if isinstance(corpus, CorpusPart):
        return windows_of(corpus)
    if not isinstance(corpus, (dict, DatasetDict, IterableDatasetDict)):
        return windows_of(corpus_parts(corpus, text_column=text_column, streaming=streaming, cache_dir=cache_dir))
    parts = {
        name: split if isinstance(split, CorpusPart) else CorpusPart(
            load_text_dataset(split, text_column, streaming=streaming), text_column, split=None
        )
        for name, split in corpus.items()
    }
    return {name: windows_of(_named(part, name)) for name, part in parts.items()}


def _named(part: CorpusPart, name: str) -> CorpusPart:
    """A whole-corpus part that error messages call `the '<name>' split`."""
    return dataclasses.replace(part, label=f"the {name!r} split") if part.split is None else part


def split_corpus(
    corpus: TextSource,
    train_fraction: float = 0.9,
    *,
    by: Literal["characters", "documents"] = "characters",
    seed: int = 123,
    text_column: str = "text",
) -> DatasetDict:
    """Split a corpus into "train" and "validation" texts in memory, before windowing.

    `by="characters"` is the book's chapter 5 split, deterministic: the first `int(train_fraction * n)` of
    the corpus' `n` characters train, the rest validate (the document holding the cut is cut in two).
    `by="documents"` shuffles whole documents with `seed` and keeps `train_fraction` of them for training.
    `corpus` is anything `load_text_dataset` reads but a stream; only the text column is kept. A corpus larger
    than memory is split as it is read, by the `corpus_parts` this function reads.
    """
    parts = corpus_parts(corpus, train_fraction, by=by, seed=seed, text_column=text_column)
    if parts["train"].num_documents is None:
        raise ValueError("split_corpus cannot split a stream: give a streamed corpus its own validation corpus")
    features = _text_features(text_column)
    return DatasetDict({
        side: Dataset.from_dict({text_column: ["".join(text) for text in part.documents_text()]}, features=features)
        for side, part in parts.items()
    })
