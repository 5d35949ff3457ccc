"""Chapter 2, tokenization: byte-level BPE the way GPT-2 does it, built with the `tokenizers` library.

The book's chapter 2 tokenizes with tiktoken's `gpt2` encoding. Here the same tokenizer is a
`PreTrainedTokenizerFast`, so that it saves next to a model and loads back with `AutoTokenizer`:

- `gpt2_tokenizer(vocab_file, merges_file)` builds GPT-2's exact tokenizer from OpenAI's `encoder.json`
  and `vocab.bpe`, with no network. Its ids equal `tiktoken.get_encoding("gpt2")`'s on any text.
- `train_bpe_tokenizer(corpus, vocab_size)` trains a new byte-level BPE vocabulary on a corpus.

Both work on bytes: every string (any script, emoji, whitespace runs) has an encoding, and
`decode(encode(text)) == text` exactly, since no normalizer touches the text and decoding does not
"clean up" spaces. `<|endoftext|>` is a special token, recognised inside text (as tiktoken does with
`allowed_special={"<|endoftext|>"}`); it is the end-of-text token and, unless told otherwise, the padding
token (the book pads with it in chapters 6 and 7).
"""

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .hub import is_local_path


__all__ = ["EOS_TOKEN", "gpt2_tokenizer", "gpt2_tokenizer_from_dir", "train_bpe_tokenizer"]

EOS_TOKEN = "<|endoftext|>"  # GPT-2's only special token: id 50256, the last of its vocabulary
NUM_BYTE_TOKENS = 256  # byte-level BPE starts from one token per byte value

# A corpus for `train_bpe_tokenizer`: one file (a path), several files (a list of `Path`s), or texts.
Corpus = str | os.PathLike | Iterable[str] | Iterable[os.PathLike]


def gpt2_tokenizer(
    vocab_file: str | os.PathLike, merges_file: str | os.PathLike, *, pad_token: str | None = EOS_TOKEN
) -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer from OpenAI's `encoder.json` (token -> id) and `vocab.bpe` (merges), offline.

    Gives the ids of tiktoken's `gpt2` encoding, `<|endoftext|>` (id 50256) included.
    `pad_token=None` leaves the tokenizer without padding token, as OpenAI released it.
    """
    for path in (vocab_file, merges_file):
        if not Path(path).is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer file not found: {path}")
    bpe = models.BPE.from_file(str(vocab_file), str(merges_file))
    return _byte_level_tokenizer(Tokenizer(bpe), pad_token)


def gpt2_tokenizer_from_dir(folder: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A GPT-2 style tokenizer from a folder: OpenAI's `encoder.json` + `vocab.bpe`, or a saved tokenizer.

    A folder without OpenAI's two files is read by `AutoTokenizer.from_pretrained` (a folder written by
    `save_pretrained`, or a Hub id such as "openai-community/gpt2" when the network is there).
    """
    path = Path(folder).expanduser()
    vocab_file, merges_file = path / "encoder.json", path / "vocab.bpe"
    if vocab_file.is_file() and merges_file.is_file():
        return gpt2_tokenizer(vocab_file, merges_file)
    if is_local_path(folder) and not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    # Older Hub configs leave clean_up_tokenization_spaces unset, and it used to default to True.
    return AutoTokenizer.from_pretrained(str(folder), clean_up_tokenization_spaces=False)


def train_bpe_tokenizer(
    corpus: Corpus,
    vocab_size: int,
    *,
    min_frequency: int = 2,
    pad_token: str | None = EOS_TOKEN,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer as GPT-2's (same pre-tokenization regex, bytes as base alphabet).

    Args:
        corpus: a path (`str` or `Path`) of one text file, a list of `Path`s, or an iterable of texts
            (`list[str]`, a generator, a `datasets` column). A file is read whole, as one document.
            A list of `str` is texts, not file names: give files as `Path`s.
        vocab_size: the size of the vocabulary: 256 byte tokens, the special tokens, then merges.
            A small corpus can run out of pairs to merge before reaching it.
        min_frequency: a pair must occur this often to be merged.
        pad_token: the padding token; `<|endoftext|>` as GPT-2 pads in the book, or a new special token,
            or None for no padding token.

    Special tokens take the first ids (`<|endoftext|>` is 0), then the 256 bytes, then the merges.
    """
    special_tokens = [EOS_TOKEN] + ([pad_token] if pad_token not in (None, EOS_TOKEN) else [])
    smallest = NUM_BYTE_TOKENS + len(special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ValueError(
            f"vocab_size must be at least {smallest} ({NUM_BYTE_TOKENS} byte tokens + {len(special_tokens)} "
            f"special), got {vocab_size!r}"
        )
    tokenizer = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=False,
    )
    _set_byte_level_pipeline(tokenizer)
    texts = _CharacterCount(_corpus_texts(corpus))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if texts.characters == 0:
        raise ValueError("cannot train a tokenizer on an empty corpus: it has no text")
    return _byte_level_tokenizer(tokenizer, pad_token)


def _set_byte_level_pipeline(tokenizer: Tokenizer) -> None:
    """GPT-2's byte-level pipeline: its regex split with no prefix space, bytes mapped to printable chars."""
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; ids untouched


def _byte_level_tokenizer(tokenizer: Tokenizer, pad_token: str | None) -> PreTrainedTokenizerFast:
    """Wrap a BPE model as GPT-2 does: byte-level pipeline, `<|endoftext|>` as eos, bos and unk."""
    _set_byte_level_pipeline(tokenizer)
    special = [AddedToken(EOS_TOKEN, special=True, normalized=False)]
    if pad_token is not None and pad_token != EOS_TOKEN:
        special.append(AddedToken(pad_token, special=True, normalized=False))
    tokenizer.add_special_tokens(special)  # matched in raw text before the BPE runs
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        clean_up_tokenization_spaces=False,  # else decode() drops spaces before punctuation
    )


def _corpus_texts(corpus: Corpus) -> Iterator[str]:
    """The documents of a corpus: a file's whole text per file, or the given texts one by one."""
    if isinstance(corpus, (str, os.PathLike)):
        corpus = [Path(corpus)]
    if isinstance(corpus, (list, tuple)):  # tell a missing file before training starts
        for item in corpus:
            if isinstance(item, os.PathLike) and not Path(item).is_file():
                raise FileNotFoundError(f"corpus file not found: {item}")
    return (_text_of(item) for item in corpus)


def _text_of(item: str | os.PathLike) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, os.PathLike):
        if not Path(item).is_file():
            raise FileNotFoundError(f"corpus file not found: {item}")
        return Path(item).read_text(encoding="utf-8")
    raise ValueError(f"a corpus holds texts (str) or files (Path), got a {type(item).__name__}")


class _CharacterCount:
    """An iterator over texts that counts their characters, to tell an empty corpus after training."""

    def __init__(self, texts: Iterator[str]):
        self.texts, self.characters = texts, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.characters += len(text)
            yield text
