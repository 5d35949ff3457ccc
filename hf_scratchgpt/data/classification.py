"""Chapter 6, classification data: the SMS Spam Collection, the book's balanced split, and its token ids.

The messages are read line by line (`label<TAB>text`), balanced and split as the book's pandas code does, and
tokenized with chapter 2's `tokenize_dataset`, which keeps the `label` column. Unlike the book's `SpamDataset`,
the texts are not padded here: a collator pads each batch, and the model reads each text's last real token (see
`classification_features`).
"""

import os
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from transformers import PreTrainedTokenizerBase

from .pretraining import tokenize_dataset


__all__ = ["SMS_LABELS", "load_sms_spam", "sms_spam_splits", "classification_features"]

SMS_LABELS = ("ham", "spam")  # label ids 0 and 1, as the book maps them


def load_sms_spam(path: str | os.PathLike) -> Dataset:
    """The SMS Spam Collection (`label<TAB>text` lines, no header) as columns `text` and `label` (ham 0, spam 1).

    Every line is one message: 5,574 messages in v.1. (The book reads the file with pandas' default quoting,
    which joins a few lines that start with a quote; this reads the lines as they are.)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SMS spam file not found: {path}")
    texts, labels = [], []
    with path.open(encoding="utf-8") as lines:  # split at newlines only: a message may hold other separators
        for number, line in enumerate(lines, start=1):
            label, tab, text = line.removesuffix("\n").partition("\t")
            if not tab or label not in SMS_LABELS:
                expected = "expected 'ham<TAB>text' or 'spam<TAB>text'"
                raise ValueError(f"{path}, line {number}: {expected}, got {line[:40]!r}")
            texts.append(text)
            labels.append(SMS_LABELS.index(label))
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(SMS_LABELS))})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def sms_spam_splits(
    dataset: Dataset, *, train_fraction: float = 0.7, validation_fraction: float = 0.1, seed: int = 123
) -> DatasetDict:
    """The book's balanced split: as many ham messages as spam ones, shuffled, then 70% / 10% / 20%.

    Draws the same rows as the book's pandas code (`sample(n, random_state=123)`, `sample(frac=1, ...)`),
    which permutes with numpy's `RandomState(seed)`: 1,045 / 149 / 300 messages from the full collection.
    """
    labels = np.asarray(dataset["label"])
    spam, ham = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if len(spam) == 0 or len(ham) < len(spam):
        raise ValueError(
            f"a balanced split needs at least as many ham as spam messages: {len(ham)} ham, {len(spam)} spam"
        )
    ham = ham[np.random.RandomState(seed).permutation(len(ham))[: len(spam)]]  # pandas' sample(n, random_state)
    balanced = np.concatenate([ham, spam])
    balanced = balanced[np.random.RandomState(seed).permutation(len(balanced))]  # pandas' sample(frac=1, ...)
    train_end = int(len(balanced) * train_fraction)
    validation_end = train_end + int(len(balanced) * validation_fraction)
    return DatasetDict(
        train=dataset.select(balanced[:train_end]),
        validation=dataset.select(balanced[train_end:validation_end]),
        test=dataset.select(balanced[validation_end:]),
    )


def classification_features(
    splits: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    context_length: int | None = None,
    text_column: str = "text",
) -> DatasetDict:
    """Each split's texts as `input_ids` cut to `max_length` tokens, beside their `label`.

    As the book's `SpamDataset`: with no `max_length`, the longest training text sets it (at most the model's
    `context_length`), and longer texts are cut to it. The padding differs. The book pads every text to
    `max_length` with `<|endoftext|>` and classifies from the last position, so the logits of a shorter text
    come after its padding tokens. Here the texts stay unpadded: a collator pads each batch to its longest text,
    and `ScratchGPTForSequenceClassification` reads the last real (non-padding) token. So a text's logits do not
    depend on padding, unlike the book's, and equal the book's only for a text of exactly `max_length` tokens.
    """
    if max_length is not None and context_length is not None and max_length > context_length:
        raise ValueError(f"max_length {max_length} is longer than the model's context_length of {context_length}")
    tokenized = DatasetDict(
        {name: tokenize_dataset(split, tokenizer, text_column=text_column) for name, split in splits.items()}
    )
    for name, split in tokenized.items():
        empty = [i for i, ids in enumerate(split["input_ids"]) if not ids]
        if empty:
            raise ValueError(f"{name} split, row {empty[0]}: a text with no tokens cannot be classified")
    if max_length is None:
        max_length = max(len(ids) for ids in tokenized["train"]["input_ids"])
        max_length = min(max_length, context_length or max_length)
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    return tokenized.map(lambda batch: {"input_ids": [ids[:max_length] for ids in batch["input_ids"]]}, batched=True)
