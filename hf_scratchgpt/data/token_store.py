"""Chapter 2, data sampling past memory: token ids on disk, and the book's windows cut from them on demand.

The book encodes its 20,000-character story in one call and keeps every window in memory. A corpus of gigabytes
needs three changes, none of which changes a window:

- Text is read in pieces of about 64K characters (`CorpusPart.pieces`), each cut just before a space or newline
  that follows a non-space. GPT-2's byte-level pre-tokenizer splits the text there too, and BPE never merges
  across its splits, so the ids of the pieces are the ids of the whole text. (A tokenizer with another
  pre-tokenizer may tokenize the few cut points differently.)
- `token_store` tokenizes the pieces once, in batches that `tokenizers` encodes on all cores, and `datasets`
  (`Dataset.from_generator`) writes each batch of ids to an Arrow file as it is made; `num_proc` processes each take
  a contiguous run of the pieces. The ids are of the smallest integer type that holds the vocabulary (uint16 for
  GPT-2's 50,257 tokens). The files go into a folder named by a fingerprint of the corpus, the tokenizer and the
  split: every process of a run, and every later run on the same data, memory-maps the same files.
- `TokenWindows` is the book's `GPTDatasetV1` over those files: window `i` is `token_ids[i * stride :][:length]`,
  sliced from the memory map when it is asked for. Window length and stride are not part of the fingerprint:
  another context length cuts other windows from the same ids, with nothing to tokenize again.

`stream_windows` cuts the same windows from a stream instead (an `IterableDataset`), tokenizing as it reads.

A `CorpusPart` is what is read: files or the text column of a dataset, all of it or one side of the chapter 5
split (by characters: the first `train_fraction` of the characters train; or by documents, shuffled with a seed).
"""

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, IterableDataset, List, Value, concatenate_datasets
from transformers import PreTrainedTokenizerBase


__all__ = ["CorpusPart", "TokenStore", "TokenWindows", "stream_windows", "token_dtype", "token_store"]

PIECE_CHARS = 1 << 16  # characters per piece of text: a tokenizer call holds a batch of them, not a whole file
READ_CHARS = 1 << 20  # characters read from a file at a time
PIECES_PER_BATCH = 32  # pieces per tokenizing batch, and rows per record batch written (about 2M characters)
STORE_VERSION = 1  # part of every fingerprint: bump it when the stored ids of a corpus would change
MANIFEST = "store.json"  # written last: a folder without it is unfinished


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id: uint16 up to 65,536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ----------------------------------------------------------------------------------------------------------
# What is read: a corpus, or one side of its split


@dataclass(eq=False)
class CorpusPart:
    """Documents read lazily, each file or each row of `text_column` one document, and which of them are kept.

    `split` is None (all of it) or `(by, train_fraction, seed, side)`: `by="characters"` keeps, for side "train",
    the first `int(train_fraction * n)` of the documents' `n` characters and, for "validation", the rest (the
    document holding the cut is cut in two), as the book's chapter 5; `by="documents"` keeps the documents that
    `Dataset.train_test_split(train_size=train_fraction, seed=seed)` gives that side, in its order.
    """

    documents: tuple[Path, ...] | Dataset | IterableDataset
    text_column: str = "text"
    split: tuple[Literal["characters", "documents"], float, int, Literal["train", "validation"]] | None = None
    label: str | None = None  # what error messages call it; default "the corpus" or "the 'train' split"

    @property
    def name(self) -> str:
        if self.label is not None:
            return self.label
        return "the corpus" if self.split is None else f"the {self.split[3]!r} split"

    @property
    def num_documents(self) -> int | None:
        """The documents of the whole corpus, None for a stream."""
        return None if isinstance(self.documents, IterableDataset) else len(self.documents)

    def fingerprint(self) -> str:
        """Names the text this part holds: files by path, size and modification time; a dataset by its fingerprint."""
        if isinstance(self.documents, IterableDataset):
            raise ValueError(f"{self.name} is a stream: it has no fingerprint to store its token ids under")
        if isinstance(self.documents, Dataset):
            source = ["dataset", self.documents._fingerprint, self.text_column]
        else:
            source = [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in self.documents]
        return _hash([STORE_VERSION, PIECE_CHARS, source, self.split])

    def documents_text(self) -> Iterator[Iterator[str]]:
        """The kept documents in order, each as the pieces of its kept text (an empty document: one empty piece)."""
        start, end = self._character_range
        position = 0  # characters of the documents before this one, kept or not
        for chunks in self._read_documents():
            if end is not None and position > end:
                return  # nothing after the cut is kept
            text = _KeptText(chunks, position, start, end)
            pieces = _cut_pieces(text)
            first = next(pieces)  # "" only when nothing of the document is kept
            # An empty document is kept where split_corpus puts it: in train up to the cut, in validation after it.
            empty = text.position == position
            empty_kept = empty and (start == 0 or position > start) and (end is None or position <= end)
            if first or empty_kept:
                yield itertools.chain([first], pieces)
            for _ in pieces:  # whatever the reader left: the position must reach the document's end
                pass
            position = text.position

    def pieces(self) -> Iterator[dict]:
        """Rows of about PIECE_CHARS characters of kept text; `new_document` marks where an end-of-text token goes."""
        for index, pieces in enumerate(self.documents_text()):
            for number, text in enumerate(pieces):
                yield {"text": text, "new_document": index > 0 and number == 0}

    def characters(self) -> int:
        """All the characters of the documents, not only the kept ones (read once per part: see _character_range)."""
        if self.num_documents is None:
            raise ValueError(
                f"{self.name}: a stream cannot be split by characters, its length is unknown until it ends; give it "
                "a validation split of its own"
            )
        if isinstance(self.documents, Dataset):
            column = self.documents.select_columns([self.text_column]).with_format("arrow")
            return sum(pc.sum(pc.utf8_length(batch[self.text_column])).as_py() or 0 for batch in column.iter(10_000))
        return sum(len(chunk) for path in self.documents for chunk in _read_file(path))

    @cached_property
    def _character_range(self) -> tuple[int, int | None]:
        if self.split is None or self.split[0] == "documents":
            return 0, None
        by, fraction, _, side = self.split
        if by != "characters":
            raise ValueError(f"by must be 'characters' or 'documents', got {by!r}")
        cut = int(fraction * self.characters())  # the book: int(train_ratio * len(text_data))
        return (0, cut) if side == "train" else (cut, None)

    def _read_documents(self) -> Iterator[Iterator[str]]:
        order = self._document_order()
        if isinstance(self.documents, tuple):
            for index in order if order is not None else range(len(self.documents)):
                yield _read_file(self.documents[index])
            return
        documents = self.documents if order is None else self.documents.select(order)
        if isinstance(documents, IterableDataset):
            rows = (row[self.text_column] for row in documents)
        else:
            rows = (text for batch in documents.select_columns([self.text_column]).iter(256)
                    for text in batch[self.text_column])
        for text in rows:
            yield iter([text])

    def _document_order(self) -> list[int] | None:
        if self.split is None or self.split[0] != "documents":
            return None
        _, fraction, seed, side = self.split
        if self.num_documents is None:
            raise ValueError(
                f"{self.name}: a stream cannot be split by documents; give it a validation split of its own"
            )
        if self.num_documents < 2:
            raise ValueError(f"cannot split {self.num_documents} document by documents; split by characters")
        indices = Dataset.from_dict({"index": np.arange(self.num_documents)})
        parts = indices.train_test_split(train_size=fraction, seed=seed)  # split_corpus' permutation
        return parts["train" if side == "train" else "test"]["index"][:]


class _KeptText:
    """The characters of one document that fall inside `[start, end)` of the corpus, read from its chunks."""

    def __init__(self, chunks: Iterable[str], position: int, start: int, end: int | None):
        self.chunks, self.position, self.start, self.end = chunks, position, start, end

    def __iter__(self) -> Iterator[str]:
        for chunk in self.chunks:
            begin = max(self.start - self.position, 0)
            stop = len(chunk) if self.end is None else min(max(self.end - self.position, 0), len(chunk))
            self.position += len(chunk)
            if begin < stop:
                yield chunk[begin:stop]


def _read_file(path: Path) -> Iterator[str]:
    """A text file in chunks of READ_CHARS characters, newlines read as Python's open() reads them."""
    with open(path, encoding="utf-8") as file:
        while chunk := file.read(READ_CHARS):
            yield chunk


def _cut_pieces(chunks: Iterable[str]) -> Iterator[str]:
    """A document's text, from chunks of any size, as pieces of about PIECE_CHARS characters cut where GPT-2's
    pre-tokenizer also splits: before a space or newline that follows a non-space. Always at least one piece."""
    buffer, begin = "", 0
    for chunk in chunks:
        buffer, begin = buffer[begin:] + chunk, 0
        while len(buffer) - begin >= 2 * PIECE_CHARS:
            cut = _piece_end(buffer, begin)
            if cut is None:
                if len(buffer) - begin < 64 * PIECE_CHARS:
                    break  # read on: a place to cut may come
                cut = begin + PIECE_CHARS  # 4M characters without one: cut anyway
            yield buffer[begin:cut]
            begin = cut
    while len(buffer) - begin > PIECE_CHARS and (cut := _piece_end(buffer, begin)) is not None:
        yield buffer[begin:cut]
        begin = cut
    yield buffer[begin:]


def _piece_end(text: str, begin: int) -> int | None:
    """Where a piece that starts at `begin` ends: the last place in its first PIECE_CHARS characters, else the first
    place after them, where a space or newline follows a non-space; None when `text` has none."""
    limit = begin + PIECE_CHARS
    position = limit + 1
    while position > begin + 1:  # backwards from the limit
        position = max(text.rfind(" ", begin + 1, position), text.rfind("\n", begin + 1, position))
        if position <= begin:
            break
        if not text[position - 1].isspace():
            return position
    position = limit
    while position < len(text):  # forwards from it
        found = [p for p in (text.find(" ", position), text.find("\n", position)) if p >= 0]
        if not found:
            return None
        position = min(found)
        if not text[position - 1].isspace():
            return position
        position += 1
    return None


# ----------------------------------------------------------------------------------------------------------
# Token ids on disk


@dataclass
class TokenStore:
    """A corpus part's token ids in memory-mapped Arrow files: `tokens` has one row of `input_ids` per piece."""

    path: Path
    tokens: Dataset
    num_tokens: int
    reused: bool  # found on disk, nothing tokenized


def token_store(
    part: CorpusPart,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> TokenStore:
    """The token ids of `part`, tokenized and written once, then reused.

    The folder is `cache_dir` (default: `datasets`' cache, `HF_DATASETS_CACHE`) / `tokens-<fingerprint>`, the
    fingerprint of the part's text and of the tokenizer. It is built under a temporary name and renamed when
    complete, so a process that finds it finds it whole. Under several processes, let one build it while the
    others wait (`TrainingArguments.main_process_first(local=False)`), then they all read it.
    """
    root = Path(cache_dir if cache_dir is not None else datasets.config.HF_DATASETS_CACHE).expanduser()
    folder = root / f"tokens-{_hash([part.fingerprint(), tokenizer_fingerprint(tokenizer)])}"
    reused = (folder / MANIFEST).is_file()
    if not reused:
        _build_store(part, tokenizer, folder, num_proc)
    manifest = json.loads((folder / MANIFEST).read_text())
    tokens = concatenate_datasets([Dataset.from_file(str(folder / name)) for name in manifest["files"]])
    return TokenStore(folder, tokens, manifest["num_tokens"], reused)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's whole definition (vocabulary, merges, pipeline) and its end-of-text id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer)
    return _hash([definition, tokenizer.eos_token_id])


def _build_store(part: CorpusPart, tokenizer: PreTrainedTokenizerBase, folder: Path, num_proc: int | None) -> None:
    """Token ids written to Arrow files batch by batch as the text is read, then the manifest, then the rename."""
    if tokenizer.eos_token_id is None and (part.num_documents or 0) > 1:
        raise ValueError("the tokenizer has no eos_token to put between documents")
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"{folder.name}.building-", dir=folder.parent))
    try:
        # Several processes each tokenize a contiguous run of the pieces, counted first; `datasets` writes one file
        # per process and keeps them in order.
        processes = num_proc if num_proc and num_proc > 1 else None
        num_pieces = sum(1 for _ in part.pieces()) if processes else None
        ids = List(Value(token_dtype(len(tokenizer)).name))
        tokens = Dataset.from_generator(
            _token_rows,
            features=Features({"input_ids": ids}),
            gen_kwargs=dict(
                part=part, tokenizer=tokenizer, shards=list(range(processes or 1)), num_shards=processes or 1,
                num_pieces=num_pieces,
            ),
            num_proc=processes,
            cache_dir=str(building / "cache"),
            fingerprint=folder.name,
            writer_batch_size=PIECES_PER_BATCH,
        )
        for file in tokens.cache_files:  # out of the builder's folders, beside the manifest
            os.rename(file["filename"], building / Path(file["filename"]).name)
        lengths = tokens.data.column("input_ids").chunks
        manifest = dict(
            files=[Path(file["filename"]).name for file in tokens.cache_files],
            num_tokens=sum(pc.sum(pc.list_value_length(chunk)).as_py() or 0 for chunk in lengths),
            dtype=ids.feature.dtype,
            corpus=part.name,
        )
        del tokens, lengths
        shutil.rmtree(building / "cache")
        (building / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if folder.is_dir() and not (folder / MANIFEST).is_file():  # damaged: only a whole store is ever renamed in
            shutil.rmtree(folder)
        try:
            building.rename(folder)
        except OSError:  # another run finished the same store first: keep its folder
            if not (folder / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _token_rows(
    part: CorpusPart, tokenizer: PreTrainedTokenizerBase, shards: Sequence[int] = (0,), num_shards: int = 1,
    num_pieces: int | None = None,
) -> Iterator[dict]:
    """Rows of token ids, one per piece of `part`. Given `num_pieces`, the pieces are shared among `num_shards`
    processes in contiguous runs: this one tokenizes the runs of its `shards`, on one thread each."""
    for shard in shards:
        pieces = part.pieces()
        if num_pieces is not None:
            pieces = itertools.islice(pieces, shard * num_pieces // num_shards, (shard + 1) * num_pieces // num_shards)
        for batch in _batches(pieces, PIECES_PER_BATCH):
            for ids in _tokenize_pieces(batch, tokenizer, one_thread=num_pieces is not None):
                yield {"input_ids": ids}


def _tokenize_pieces(batch: dict, tokenizer: PreTrainedTokenizerBase, one_thread: bool = False) -> list[list[int]]:
    """Ids of a batch of pieces, with the end-of-text id in front of a piece that starts a new document.

    The Rust tokenizer encodes a batch on all cores; `one_thread` keeps it to one, in each of several processes.
    """
    if one_thread:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by tokenizers at each batch call
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer's batch call, without the offsets nobody reads here
        encoded = [encoding.ids for encoding in backend.encode_batch_fast(batch["text"], add_special_tokens=False)]
    else:
        encoded = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False)["input_ids"]
    eos_id = tokenizer.eos_token_id
    if any(batch["new_document"]) and eos_id is None:
        raise ValueError("the tokenizer has no eos_token to put between documents")
    return [[eos_id, *ids] if new else ids for ids, new in zip(encoded, batch["new_document"])]


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Windows: the book's GPTDatasetV1, from the store or from a stream


class TokenWindows(torch.utils.data.Dataset):
    """The book's sliding windows over a `TokenStore`: `input_ids = labels = token_ids[i : i + length]` for the
    starts `i` in `range(0, num_tokens - length, stride)`, read from the memory map when indexed.

    Rows are int64 numpy arrays (the loss wants long labels); each process maps the same files, which the
    operating system keeps once in its page cache.
    """

    def __init__(self, store: TokenStore, length: int, stride: int, where: str = "the corpus"):
        check_enough_tokens(store.num_tokens, length, where)
        self.store, self.length, self.stride = store, length, stride
        self.starts = range(0, store.num_tokens - length, stride)  # the book's range(0, len(ids) - max_length, stride)
        self._arrays = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict:
        start = self.starts[index]
        ids = self._slice(start, start + self.length).astype(np.int64)
        return {"input_ids": ids, "labels": ids.copy()}

    def __iter__(self) -> Iterator[dict]:
        return (self[index] for index in range(len(self)))

    def __getstate__(self) -> dict:  # a DataLoader worker maps the files again, it is not sent their bytes
        return {**self.__dict__, "_arrays": None}

    def _slice(self, begin: int, end: int) -> np.ndarray:
        if self._arrays is None:
            # Views of the memory-mapped record batches, no copy: one per batch the store was written in.
            chunks = self.store.tokens.data.column("input_ids").chunks
            self._arrays = [chunk.flatten().to_numpy(zero_copy_only=True) for chunk in chunks if len(chunk)]
            self._offsets = np.cumsum([0] + [len(array) for array in self._arrays])
        first = int(np.searchsorted(self._offsets, begin, side="right")) - 1
        parts, position = [], begin
        for array, offset in zip(self._arrays[first:], self._offsets[first:]):
            parts.append(array[position - offset : end - offset])
            position = offset + len(array)
            if position >= end:
                break
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def stream_windows(
    part: CorpusPart, tokenizer: PreTrainedTokenizerBase, length: int, stride: int
) -> IterableDataset:
    """The same windows as `TokenWindows`, cut while `part` is read and tokenized: nothing is stored."""
    ids = List(Value("int64"), length=length)  # int64: the loss wants long labels
    options = dict(part=part, tokenizer=tokenizer, length=length, stride=stride)
    features = Features(input_ids=ids, labels=ids)
    return IterableDataset.from_generator(_stream_windows, gen_kwargs=options, features=features)


def _stream_windows(part: CorpusPart, tokenizer: PreTrainedTokenizerBase, length: int, stride: int) -> Iterator[dict]:
    """Windows from a rolling buffer over the tokenized pieces."""
    buffer: list[int] = []
    start = 0  # where the next window starts, in `buffer`; past its end while a long stride skips tokens
    seen_tokens = windows = 0
    for row in _token_rows(part, tokenizer):
        buffer.extend(row["input_ids"])
        seen_tokens += len(row["input_ids"])
        while len(buffer) - start > length:  # a window and the token after it, as the book's range end
            window = buffer[start : start + length]
            yield {"input_ids": window, "labels": window}
            windows += 1
            start += stride
        consumed = min(start, len(buffer))
        del buffer[:consumed]
        start -= consumed
    if windows == 0:
        check_enough_tokens(seen_tokens, length, part.name)


def _batches(rows: Iterator[dict], size: int) -> Iterator[dict]:
    """Rows as batches: dicts of lists of at most `size` values."""
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield {key: [item[key] for item in batch] for key in batch[0]}
            batch = []
    if batch:
        yield {key: [item[key] for item in batch] for key in batch[0]}


def check_enough_tokens(num_tokens: int, length: int, where: str) -> None:
    if num_tokens == 0:
        raise ValueError(f"{where} is empty: its documents hold no tokens")
    if num_tokens <= length:
        raise ValueError(
            f"{where} has {num_tokens} tokens, fewer than one window needs: {length + 1} "
            f"(length {length} + 1, as the book's GPTDatasetV1)"
        )
