"""Chapter 6, classification data: texts and their labels from any table, the book's SMS Spam Collection, the
splits, and token ids.

The book reads one file (the SMS Spam Collection, `label<TAB>text`), balances it to as many ham as spam
messages and cuts it 70/10/20 with pandas. Here the same steps serve any labelled texts:

- `load_classification_data` reads a CSV, TSV, JSON, JSON Lines or Parquet file, or a Hub dataset (with its
  own splits when it has them), and keeps two columns, `text` and `label`, whatever they were called. Labels
  may be strings, integers (with names given, or named by their values) or a `ClassLabel` column; they become
  a `ClassLabel`, whose names the recipe gives the model (`id2label`), so that a saved classifier answers with
  names. Every check is done here, before any work: a missing column (the error lists those there are), rows
  without a text or a label (the error names them), one class only, a label in the validation or test data
  that the training data never has.
- `classification_splits` cuts the splits that were not given from the training data: a stratified 70/10/20
  split (each class in the same shares), after undersampling every class to the smallest with `balance`.
- `load_sms_spam` and `sms_spam_splits` are the book's file and its balanced split (1,045 / 149 / 300), drawn as
  the book's pandas code draws it from every line of the file (the book's own read has 2 ham messages fewer).
- `classification_features` tokenizes with chapter 2's `tokenize_dataset`, which keeps the `label` column.
  Unlike the book's `SpamDataset`, the texts are not padded here: a collator pads each batch, and the model
  reads each text's last real token. Texts longer than `max_length` are cut, with a warning that counts them.
"""

import math
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
from transformers import PreTrainedTokenizerBase

from ..hub import is_local_path
from .pretraining import tokenize_dataset


__all__ = [
    "SMS_LABELS",
    "SPLITS",
    "TABLE_FORMATS",
    "load_sms_spam",
    "sms_spam_splits",
    "read_table",
    "load_classification_data",
    "balance_classes",
    "stratified_split",
    "classification_splits",
    "classification_features",
]

SMS_LABELS = ("ham", "spam")  # label ids 0 and 1, as the book maps them
SPLITS = ("train", "validation", "test")
SHARES = {"train": 0.7, "validation": 0.1, "test": 0.2}  # the book's 70/10/20
# File endings and the `datasets` builder that reads them (with its options).
TABLE_FORMATS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
SHOWN_ROWS = 10  # rows named in an error at most


# ----------------------------------------------------------------------------------------------------------
# The book's file: the SMS Spam Collection


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

    Draws the rows the book's pandas code (`sample(n, random_state=123)`, `sample(frac=1, ...)`, which permutes with
    numpy's `RandomState(seed)`) draws from the same messages: 1,045 / 149 / 300 from the full collection. Not the
    book's exact rows: its `read_csv` joins a few lines that start with a quote, so it samples from 4,825 ham
    messages where `load_sms_spam` reads 4,827, and about a fifth of the test messages differ.
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


# ----------------------------------------------------------------------------------------------------------
# Any labelled texts: files or a Hub dataset, two columns, labels as a ClassLabel


def read_table(path: str | os.PathLike) -> Dataset:
    """A CSV, TSV, JSON (a list of objects, or one per line), JSON Lines or Parquet file as a dataset.

    In CSV and TSV files only an empty cell is missing (pandas would also read "NA" or "null" as missing).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() not in TABLE_FORMATS:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; expected one of {', '.join(TABLE_FORMATS)}")
    builder, options = TABLE_FORMATS[path.suffix.lower()]
    if builder == "csv":
        options = {**options, "keep_default_na": False, "na_values": [""]}
    try:
        return load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # the builders raise their own kinds (pyarrow, pandas, DatasetGenerationError)
        cause = err.__cause__ or err
        raise ValueError(f"{path}: cannot read it as {builder}: {str(cause).strip().splitlines()[0]}") from err


def load_classification_data(
    *,
    train_file: str | os.PathLike | None = None,
    validation_file: str | os.PathLike | None = None,
    test_file: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
) -> DatasetDict:
    """The given splits (`train`, and `validation` and `test` when there are), as columns `text` and `label`.

    Args:
        train_file, validation_file, test_file: files (see `read_table`); or
        dataset_name, dataset_config_name: a Hub dataset (or a local dataset folder), with its splits `train`,
            `validation` and `test` where it has them. A split whose rows all lack a label (GLUE's test
            splits) is left out, with a warning.
        text_column, label_column: where the texts and labels are.
        class_names: the class names in the order of their ids. Integer labels are then ids into it; string
            labels must be among the names. Without it, the names are the distinct labels, sorted (integer
            labels are named by their values: 1, 2, 5 become ids 0, 1, 2 named "1", "2", "5").

    The label becomes a `ClassLabel` with every split's names the same. Bad input is one line of `ValueError`.
    """
    if bool(train_file) == bool(dataset_name):
        raise ValueError("give the training data: --train_file (CSV, TSV, JSON, JSON Lines, Parquet) or "
                         "--dataset_name (a Hub dataset), one of the two")
    if dataset_name:
        splits = _hub_splits(dataset_name, dataset_config_name)
    else:
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        splits = {name: (read_table(path), str(path)) for name, path in files.items() if path}
    for name, (dataset, where) in splits.items():
        splits[name] = (_text_and_label(dataset, where, text_column, label_column), where)
    if dataset_name:  # a Hub test split without labels (GLUE's): nothing to score against
        for name in [name for name in ("validation", "test") if name in splits]:
            dataset, where = splits[name]
            if len(dataset) and len(_missing_rows(dataset)) == len(dataset):
                warnings.warn(f"{where} has no labels: left out, and cut from the training data instead", stacklevel=2)
                del splits[name]
    return _encode_labels(splits, class_names)


def _hub_splits(name: str, config_name: str | None) -> dict[str, tuple[Dataset, str]]:
    data = load_dataset(name, config_name)
    if "train" not in data:
        raise ValueError(f"--dataset_name {name} has no 'train' split; its splits: {', '.join(data)}")
    where = f"{name}{f' ({config_name})' if config_name else ''}"
    return {split: (data[split], f"{where}, {split} split") for split in SPLITS if split in data}


def _text_and_label(dataset: Dataset, where: str, text_column: str, label_column: str) -> Dataset:
    """The two columns, renamed `text` and `label`, checked: both there, no row without a text."""
    for flag, column in (("--text_column", text_column), ("--label_column", label_column)):
        if column not in dataset.column_names:
            raise ValueError(f"{flag} {column!r} is not a column of {where}; its columns: "
                             f"{', '.join(dataset.column_names)}")
    if text_column == label_column:
        raise ValueError(f"--text_column and --label_column are both {text_column!r}")
    dataset = dataset.select_columns([text_column, label_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    if label_column != "label":
        dataset = dataset.rename_column(label_column, "label")
    missing = [i for i, text in enumerate(dataset["text"]) if text is None or text == ""]
    if missing:
        raise ValueError(f"{where}: {_rows(missing)} without a text in column {text_column!r}")
    if len(dataset) and not isinstance(dataset["text"][0], str):
        raise ValueError(f"{where}: column {text_column!r} holds {type(dataset['text'][0]).__name__}, not text")
    return dataset


def _encode_labels(splits: dict[str, tuple[Dataset, str]], class_names: Sequence[str] | None) -> DatasetDict:
    """Every split's label as a `ClassLabel` of the same names; the checks that need all splits at once."""
    for dataset, where in splits.values():
        missing = _missing_rows(dataset)
        if missing:
            raise ValueError(f"{where}: {_rows(missing)} without a label")
    feature = splits["train"][0].features["label"]
    if isinstance(feature, ClassLabel):
        names = list(class_names or feature.names)
        if len(names) != feature.num_classes:
            raise ValueError(f"--class_names gives {len(names)} names, the label column has {feature.num_classes} "
                             f"classes ({', '.join(feature.names)})")
        encode = None  # already ids
    else:
        names, encode = _label_encoding(splits, class_names)
    if len(set(names)) != len(names):
        raise ValueError(f"the label names repeat: {', '.join(names)}")
    encoded = {}
    for name, (dataset, where) in splits.items():
        if encode is not None:
            dataset = dataset.map(lambda batch: {"label": [encode(v, where) for v in batch["label"]]}, batched=True)
        encoded[name] = dataset.cast_column("label", ClassLabel(names=names))
    _check_classes(encoded, {name: where for name, (_, where) in splits.items()})
    return DatasetDict(encoded)


def _label_encoding(splits, class_names):
    """Class names and a function from a raw label (a string or an integer) to its id."""
    values, kinds = [], {}
    for dataset, where in splits.values():
        feature = dataset.features["label"]
        if type(feature).__name__ == "Json":  # what `datasets` makes of a JSON column of numbers and strings
            raise ValueError(f"{where}: the labels mix numbers and text; give them all as one or the other")
        if not isinstance(feature, Value):  # a list of labels a row (multi-label data), a dict, ...
            raise ValueError(f"{where}: each label must be one string or integer, got {feature}")
        unique = dataset.unique("label")
        values += unique
        kinds[where] = "text" if all(isinstance(v, str) for v in unique) else "numbers"
    if len(set(kinds.values())) > 1:
        text, numbers = (next(where for where, kind in kinds.items() if kind == k) for k in ("text", "numbers"))
        raise ValueError(f"{numbers} has numbers for labels where {text} has text: give every file the same kind")
    if all(isinstance(v, str) for v in values):
        names = list(class_names) if class_names else sorted(set(values))
        ids = {label: i for i, label in enumerate(names)}

        def encode(value, where):
            if value not in ids:
                raise ValueError(f"{where}: label {value!r} is not among --class_names ({', '.join(names)})")
            return ids[value]

        return names, encode
    if all(isinstance(v, bool) for v in values) and not class_names:  # true/false cells: named as written
        return ["false", "true"], lambda value, where: int(value)
    if not all(isinstance(v, (int, float)) and float(v).is_integer() for v in values):  # (bool is an int)
        odd = next(v for v in values if not (isinstance(v, (int, float)) and float(v).is_integer()))
        raise ValueError(f"labels must be strings or integers; got {odd!r} ({type(odd).__name__})")
    if class_names:
        names = list(class_names)

        def encode(value, where):
            if not 0 <= value < len(names):
                raise ValueError(f"{where}: label {int(value)} is no id of --class_names (0 to {len(names) - 1}: "
                                 f"{', '.join(names)})")
            return int(value)

        return names, encode
    distinct = sorted({int(v) for v in values})
    ids = {value: i for i, value in enumerate(distinct)}
    return [str(value) for value in distinct], lambda value, where: ids[int(value)]


def _check_classes(splits: Mapping[str, Dataset], where: Mapping[str, str]) -> None:
    names = splits["train"].features["label"].names
    seen = Counter(splits["train"]["label"])
    if len(seen) < 2:
        only = ", ".join(repr(names[i]) for i in seen) or "none"
        raise ValueError(f"{where['train']}: the labels have one class ({only}); a classifier needs at least 2")
    for name in ("validation", "test"):
        if name not in splits:
            continue
        unseen = [i for i, label in enumerate(splits[name]["label"]) if label not in seen]
        if unseen:
            label = names[splits[name]["label"][unseen[0]]]
            raise ValueError(
                f"{where[name]}: label {label!r} ({_rows(unseen)}) never appears in the training data, which has "
                f"{', '.join(names[i] for i in sorted(seen))}"
            )


def _missing_rows(dataset: Dataset) -> list[int]:
    """Rows whose label is None, NaN, or in a `ClassLabel` column -1 (how `datasets` marks a row without one)."""
    class_label = isinstance(dataset.features["label"], ClassLabel)
    return [
        i for i, value in enumerate(dataset["label"])
        if value is None or (isinstance(value, float) and math.isnan(value)) or (class_label and value == -1)
    ]


def _rows(indices: list[int]) -> str:
    """'rows 3, 8 (of the data, from 1)': rows counted from 1 as a spreadsheet shows them, header left out."""
    shown = ", ".join(str(i + 1) for i in indices[:SHOWN_ROWS])
    more = f", ... ({len(indices)} in all)" if len(indices) > SHOWN_ROWS else ""
    return f"{'row' if len(indices) == 1 else 'rows'} {shown}{more} (counted from 1 after any header)"


# ----------------------------------------------------------------------------------------------------------
# Splits: balancing, the stratified 70/10/20 split, and what a recipe calls


def balance_classes(dataset: Dataset, *, seed: int = 123) -> Dataset:
    """Every class undersampled to the size of the smallest, at random (the book's balanced spam data)."""
    labels = np.asarray(dataset["label"])
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.RandomState(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[: counts.min()] for c in classes]
    return dataset.select(np.sort(np.concatenate(keep)))


def stratified_split(dataset: Dataset, shares: Mapping[str, float], *, seed: int = 123) -> DatasetDict:
    """Split so that each class is in every split in the same shares (rounded per class), shuffled.

    `shares` maps split names to fractions summing to 1; the first split takes what rounding leaves, so a class
    of one example goes to it.
    """
    if not math.isclose(sum(shares.values()), 1.0):
        raise ValueError(f"split shares must sum to 1, got {dict(shares)}")
    labels = np.asarray(dataset["label"])
    rng = np.random.RandomState(seed)
    parts = {name: [] for name in shares}
    first, *others = shares
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for name in others:
            count = int(round(len(members) * shares[name]))
            parts[name].append(members[start : start + count])
            start += count
        parts[first].append(members[start:])
    return DatasetDict({name: dataset.select(rng.permutation(np.concatenate(parts[name]))) for name in shares})


def classification_splits(
    *,
    data_file: str | os.PathLike | None = None,
    balance: bool | None = None,
    split_seed: int = 123,
    **sources,
) -> DatasetDict:
    """`train`, `validation` and `test`, columns `text` and `label`: what the classification recipe trains on.

    `data_file` is the book's SMS Spam Collection; with `balance` (its default there) it gets the book's balanced
    split (`sms_spam_splits`). Otherwise `sources` go to `load_classification_data`, and the splits it does not
    give are cut from the training data in the book's shares (70/10/20 without any; a validation split of 1/8 of
    the training data when only a test split is given), stratified, with seed `split_seed`. `balance` (default
    off) first undersamples every class of the training data to the smallest.
    """
    if data_file and any(sources.get(key) for key in ("train_file", "dataset_name")):
        raise ValueError("give --data_file (the SMS Spam Collection) or --train_file / --dataset_name, not both")
    if data_file:
        messages = load_sms_spam(data_file)
        if balance is None or balance:
            return sms_spam_splits(messages, seed=split_seed)
        given = {"train": messages}
    else:
        given = dict(load_classification_data(**sources))
    if balance:
        given["train"] = balance_classes(given["train"], seed=split_seed)
    missing = [name for name in SPLITS if name not in given]
    if not missing:
        return DatasetDict(given)
    shares = {name: SHARES[name] for name in ("train", *missing)}
    cut = stratified_split(given["train"], {name: s / sum(shares.values()) for name, s in shares.items()},
                           seed=split_seed)
    return DatasetDict({name: cut[name] if name in cut else given[name] for name in SPLITS})


# ----------------------------------------------------------------------------------------------------------
# Token ids


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
    `context_length`), and longer texts are cut to it, with a warning that counts them. The padding differs.
    The book pads every text to `max_length` with `<|endoftext|>` and classifies from the last position, so the
    logits of a shorter text come after its padding tokens. Here the texts stay unpadded: a collator pads each
    batch to its longest text, and `ScratchGPTForSequenceClassification` reads the last real (non-padding) token.
    So a text's logits do not depend on padding, unlike the book's, and equal the book's only for a text of
    exactly `max_length` tokens.
    """
    if max_length is not None and context_length is not None and max_length > context_length:
        raise ValueError(f"max_length {max_length} is longer than the model's context_length of {context_length}")
    tokenized = DatasetDict(
        {name: tokenize_dataset(split, tokenizer, text_column=text_column) for name, split in splits.items()}
    )
    lengths = {name: np.array([len(ids) for ids in split["input_ids"]]) for name, split in tokenized.items()}
    for name, counts in lengths.items():
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            text = splits[name][int(empty[0])][text_column]
            raise ValueError(f"{name} split: the text {text[:40]!r} has no tokens and cannot be classified")
    if max_length is None:
        max_length = int(lengths["train"].max()) if len(lengths["train"]) else 1
        max_length = min(max_length, context_length or max_length)
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    cut = {name: int((counts > max_length).sum()) for name, counts in lengths.items()}
    if any(cut.values()):
        warnings.warn(
            f"{', '.join(f'{n:,} of {len(lengths[name]):,} {name}' for name, n in cut.items() if n)} texts are longer "
            f"than {max_length} tokens and were cut to their first {max_length}",
            stacklevel=2,
        )
    return tokenized.map(lambda batch: {"input_ids": [ids[:max_length] for ids in batch["input_ids"]]}, batched=True)
