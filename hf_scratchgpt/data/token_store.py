"""Chapter 2, data sampling past memory: token ids on disk, and the book's windows cut from them on demand.

The book encodes its 20,000-character story in one call and keeps every window in memory. For a corpus of
gigabytes, read in pieces (`corpus_pieces.py`), nothing changes in a window, only where the ids live:

- `token_store` tokenizes the pieces once, in batches that `tokenizers` encodes on all cores, and `datasets`
  (`Dataset.from_generator`) writes each batch of ids to an Arrow file as it is made; `num_proc` processes each take
  a contiguous run of the pieces. The ids are of the smallest integer type that holds the vocabulary (uint16 for
  GPT-2's 50,257 tokens). The files go into a folder named by a fingerprint of the corpus, the tokenizer and the
  split: every process of a run, and every later run on the same data, memory-maps the same files.
- `TokenWindows` is the book's `GPTDatasetV1` over those files: window `i` is `token_ids[i * stride :][:length]`,
  sliced from the memory map when it is asked for. Window length and stride are not part of the fingerprint:
  another context length cuts other windows from the same ids, with nothing to tokenize again.
- `stream_windows` cuts the same windows from a stream instead (an `IterableDataset`), tokenizing as it reads.
"""

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, IterableDataset, List, Value, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from .corpus_pieces import CorpusPart, stable_hash


__all__ = ["TokenStore", "TokenWindows", "stream_windows", "token_dtype", "token_store"]

PIECES_PER_BATCH = 32  # pieces per tokenizing batch, and rows per record batch written (about 2M characters)
STORE_VERSION = 1  # part of every store's fingerprint: bump it when the stored ids of a corpus would change
MANIFEST = "store.json"  # written last: a folder without it is unfinished


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id: uint16 up to 65,536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


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
    folder = root / f"tokens-{stable_hash([STORE_VERSION, part.fingerprint(), tokenizer_fingerprint(tokenizer)])}"
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
    return stable_hash([definition, tokenizer.eos_token_id])


def _from_generator(generator, **kwargs) -> Dataset:
    """`Dataset.from_generator`, with the error of the text or the tokenizer itself (a file that is not UTF-8, ...)
    raised as it is: `datasets` wraps any error of a generator in a DatasetGenerationError that names neither."""
    try:
        return Dataset.from_generator(generator, **kwargs)
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, (ValueError, OSError)):
            cause = cause.__cause__
        if cause is None or type(cause).__module__.startswith("pyarrow"):  # none, or the writer's own: as it came
            raise
        raise cause from None


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
        tokens = _from_generator(
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
