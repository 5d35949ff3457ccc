"""Chapter 6, classification data: the SMS Spam Collection and the book's balanced split."""

import csv
from pathlib import Path

import numpy as np
import pytest

from hf_scratchgpt.data.classification import load_sms_spam, sms_spam_splits


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def book_balanced_split(path: Path):
    """The book's chapter 6 pandas code; QUOTE_NONE reads every line as one message, as load_sms_spam does."""
    import pandas as pd

    df = pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"], quoting=csv.QUOTE_NONE)
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=123)
    balanced_df = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced_df["Label"] = balanced_df["Label"].map({"ham": 0, "spam": 1})
    df = balanced_df.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(df) * 0.7)
    validation_end = train_end + int(len(df) * 0.1)
    return df[:train_end], df[train_end:validation_end], df[validation_end:]


def test_sms_spam_split_is_the_books(shared_data):
    path = shared_data / "sms_spam" / "SMSSpamCollection.tsv"
    splits = sms_spam_splits(load_sms_spam(path))
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [1045, 149, 300]  # README
    for name, book in zip(("train", "validation", "test"), book_balanced_split(path), strict=True):
        assert splits[name]["text"][:] == book["Text"].tolist()
        assert splits[name]["label"][:] == book["Label"].tolist()
    labels = np.concatenate([splits[name]["label"][:] for name in splits])
    assert (labels == 1).sum() == (labels == 0).sum() == 747


def test_sms_spam_labels(shared_data):
    messages = load_sms_spam(shared_data / "sms_spam" / "SMSSpamCollection.tsv")
    assert messages.features["label"].names == ["ham", "spam"]
    assert sum(messages["label"][:]) == 747  # README: 747 spam


def test_sms_spam_bad_line_is_named(tmp_path):
    path = tmp_path / "sms.tsv"
    path.write_text("ham\tfine\nspam no tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: expected") as error:
        load_sms_spam(path)
    one_line(error)
    with pytest.raises(FileNotFoundError, match="nothing.tsv"):
        load_sms_spam(tmp_path / "nothing.tsv")
