"""Chapter 2, data sampling past memory: a corpus read lazily, in pieces that tokenize as the whole text does.

The book reads "The Verdict" into one string. A corpus of gigabytes is read a piece at a time instead:

- A `CorpusPart` is what is read: files (each one document, read in chunks, never whole) or the text column of a
  dataset (each row one document), all of it or one side of chapter 5's train/validation split. Nothing is read
  until its pieces are asked for.
- `CorpusPart.pieces` gives the kept text in pieces of about 64K characters, each cut just before a space or newline
  that follows a non-space. GPT-2's byte-level pre-tokenizer splits the text there too, and BPE never merges across
  its splits, so the ids of the pieces are the ids of the whole text (a tokenizer with another pre-tokenizer may
  tokenize the few cut points differently). A piece that starts a document after the first says so: an end-of-text
  token goes before it, as between the book's documents.
- The split is `split_corpus`'s: by characters, the first `int(train_fraction * n)` of the `n` characters train and
  the rest validate, the document holding the cut cut in two; or by documents, shuffled with a seed. A part reads
  only as far as its side needs (the validation side of a file corpus counts the characters first).

`token_store.py` tokenizes the pieces into token ids on disk, or as a stream.
"""

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, IterableDataset


__all__ = ["CorpusPart", "stable_hash"]

PIECE_CHARS = 1 << 16  # characters per piece of text: a tokenizer call holds a batch of them, not a whole file
READ_CHARS = 1 << 20  # characters read from a file at a time


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
        return stable_hash([PIECE_CHARS, source, self.split])

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
        order = self._document_order
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

    @cached_property
    def _document_order(self) -> list[int] | None:
        """The kept documents' indices, in split_corpus' order; worked out once per part, not on every pass."""
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
        try:
            while chunk := file.read(READ_CHARS):
                yield chunk
        except UnicodeDecodeError as err:
            byte = err.object[err.start]
            raise ValueError(f"{path} is not UTF-8 text ({err.reason}, byte {byte:#04x}): save it as UTF-8") from None


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


def stable_hash(value) -> str:
    """16 hex digits naming a JSON-able value, the same in every process and run."""
    return hashlib.sha256(json.dumps(value, default=str).encode()).hexdigest()[:16]
