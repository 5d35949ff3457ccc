"""Chapter 6, classification data: any labelled texts, the SMS Spam Collection, the splits and token ids."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from hf_scratchgpt.data.classification import (
    SPLITS,
    balance_classes,
    classification_features,
    classification_splits,
    load_classification_data,
    load_sms_spam,
    read_table,
    sms_spam_splits,
    stratified_split,
)


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


# ----------------------------------------------------------------------------------------------------------
# Any labelled texts: files, columns, labels, checks


TOPICS = {"sport": "the match ended in a late goal", "food": "the soup needs more salt", "weather": "rain all day"}


def write_topics_csv(path: Path, rows: int = 30) -> Path:
    """A 3-class CSV whose columns are not called text and label; 10 rows per class."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "review", "topic"])
        for i in range(rows):
            topic = list(TOPICS)[i % 3]
            writer.writerow([i, f"{TOPICS[topic]}, note {i}", topic])
    return path


def test_csv_with_named_columns_gives_text_and_a_class_label(tmp_path):
    data = load_classification_data(train_file=write_topics_csv(tmp_path / "topics.csv"), text_column="review",
                                    label_column="topic")
    assert list(data) == ["train"] and data["train"].column_names == ["text", "label"]
    assert data["train"].features["label"].names == ["food", "sport", "weather"]  # sorted
    assert data["train"][0] == {"text": "the match ended in a late goal, note 0", "label": 1}


def test_every_file_format_reads_the_same_rows(tmp_path):
    rows = [{"body": f"text number {i}, with a comma", "y": ["neg", "pos"][i % 2]} for i in range(6)]
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.tsv", "d.json", "d.jsonl", "d.parquet"):
        train = load_classification_data(train_file=tmp_path / name, text_column="body", label_column="y")["train"]
        assert train["text"][:] == frame["body"].tolist(), name
        assert train["label"][:] == [0, 1] * 3, name
    with pytest.raises(ValueError, match=r"unknown file type '\.xlsx'; expected one of \.csv, \.tsv") as error:
        read_table(tmp_path / "d.xlsx") if (tmp_path / "d.xlsx").write_text("x") else None
    one_line(error)


def test_a_cell_reading_na_is_text_not_missing(tmp_path):
    path = tmp_path / "na.csv"
    path.write_text("text,label\nNA,a\nnull,b\nnan,a\n")
    assert load_classification_data(train_file=path)["train"]["text"][:] == ["NA", "null", "nan"]


def test_integer_labels_with_given_names_and_without(tmp_path):
    path = tmp_path / "stars.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3}) + "\n" for i in range(9)))
    named = load_classification_data(train_file=path, class_names=["bad", "fair", "good"])["train"]
    assert named.features["label"].names == ["bad", "fair", "good"] and named["label"][:3] == [0, 1, 2]
    # Without names, integer labels are named by their values, in order: 1, 2, 5 become ids 0, 1, 2.
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": [5, 1, 2][i % 3]}) + "\n" for i in range(9)))
    by_value = load_classification_data(train_file=path)["train"]
    assert by_value.features["label"].names == ["1", "2", "5"] and by_value["label"][:3] == [2, 0, 1]
    # Negative integers are classes too (only a ClassLabel's -1 means "no label").
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3 - 1}) + "\n" for i in range(9)))
    assert load_classification_data(train_file=path)["train"].features["label"].names == ["-1", "0", "1"]


def test_class_label_column_keeps_its_names_and_unlabelled_hub_test_split_is_left_out(tmp_path):
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    folder = tmp_path / "hub_like"
    folder.mkdir()
    Dataset.from_dict({"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]},
                      features=features).to_parquet(folder / "train.parquet")
    Dataset.from_dict({"text": ["a", "b"], "label": [-1, -1]}, features=features).to_parquet(folder / "test.parquet")
    with pytest.warns(UserWarning, match=r"test split has no labels: left out"):
        data = load_classification_data(dataset_name=str(folder))
    assert list(data) == ["train"] and data["train"].features["label"].names == ["neg", "pos"]
    splits = classification_splits(dataset_name=str(folder))  # the test split is then cut from training
    assert [len(splits[name]) for name in SPLITS] == [14, 2, 4]


def test_hub_splits_are_kept_and_the_missing_one_is_cut_from_training(tmp_path):
    folder = tmp_path / "given"
    folder.mkdir()
    write_topics_csv(folder / "train.csv", rows=48)
    write_topics_csv(folder / "test.csv", rows=6)
    splits = classification_splits(dataset_name=str(folder), text_column="review", label_column="topic")
    assert len(splits["test"]) == 6  # given
    assert [len(splits["train"]), len(splits["validation"])] == [42, 6]  # 1/8 of training: 70 to 10
    assert set(splits["train"]["text"]).isdisjoint(splits["validation"]["text"])


def test_stratified_split_is_70_10_20_in_every_class_and_seeded(tmp_path):
    labels = [0] * 100 + [1] * 50 + [2] * 10
    data = Dataset.from_dict({"text": [str(i) for i in range(160)], "label": labels})
    splits = stratified_split(data, {"train": 0.7, "validation": 0.1, "test": 0.2}, seed=1)
    for name, share in (("train", 0.7), ("validation", 0.1), ("test", 0.2)):
        counts = np.bincount(splits[name]["label"][:], minlength=3)
        assert counts.tolist() == [round(n * share) for n in (100, 50, 10)], name
    texts = [t for name in SPLITS for t in splits[name]["text"]]
    assert sorted(texts) == sorted(data["text"])  # every row once
    again = stratified_split(data, {"train": 0.7, "validation": 0.1, "test": 0.2}, seed=1)
    other = stratified_split(data, {"train": 0.7, "validation": 0.1, "test": 0.2}, seed=2)
    assert again["test"]["text"][:] == splits["test"]["text"][:] != other["test"]["text"][:]


def test_balance_undersamples_every_class_to_the_smallest(tmp_path):
    data = Dataset.from_dict({"text": [str(i) for i in range(70)], "label": [0] * 40 + [1] * 20 + [2] * 10})
    assert np.bincount(balance_classes(data, seed=0)["label"][:]).tolist() == [10, 10, 10]
    path = write_topics_csv(tmp_path / "t.csv", rows=30)
    splits = classification_splits(train_file=path, text_column="review", label_column="topic", balance=True)
    assert [len(splits[name]) for name in SPLITS] == [21, 3, 6]


def test_sms_file_keeps_the_books_split_unless_balance_is_off(shared_data):
    path = shared_data / "sms_spam" / "SMSSpamCollection.tsv"
    assert [len(s) for s in classification_splits(data_file=path).values()] == [1045, 149, 300]
    unbalanced = classification_splits(data_file=path, balance=False)
    assert sum(len(s) for s in unbalanced.values()) == 5574
    assert [sum(unbalanced[name]["label"][:]) for name in SPLITS] == [523, 75, 149]  # 747 spam, stratified


@pytest.mark.parametrize(
    "content, options, message",
    [
        ("text,label\na,x\nb,x\nc,x\n", {}, r"the labels have one class \('x'\); a classifier needs at least 2"),
        ("text,label\na,x\nb,\nc,y\nd,\n", {}, r"rows 2, 4 \(counted from 1 after any header\) without a label"),
        ("text,label\na,x\n,y\n", {}, r"row 2 \(counted from 1 after any header\) without a text in column 'text'"),
        ('{"text": "a", "label": "x"}\n{"text": "", "label": "y"}\n', {"suffix": ".jsonl"},
         r"row 2 \(counted from 1 after any header\) without a text in column 'text'"),
        ("body,y\na,x\n", {}, r"--text_column 'text' is not a column of .*; its columns: body, y"),
        ("text,y\na,x\n", {}, r"--label_column 'label' is not a column of .*; its columns: text, y"),
        ("text,label\na,x\nb,z\n", {"class_names": ["x", "y"]}, r"label 'z' is not among --class_names \(x, y\)"),
        ("text,label\na,0\nb,3\n", {"class_names": ["x", "y"]}, r"label 3 is no id of --class_names \(0 to 1: x, y\)"),
        ("text,label\na,0.5\nb,1\n", {}, r"labels must be strings or integers; got 0.5"),
    ],
)
def test_bad_data_is_one_line_naming_the_problem(tmp_path, content, options, message):
    options = dict(options)
    path = tmp_path / f"bad{options.pop('suffix', '.csv')}"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_classification_data(train_file=path, **options)
    one_line(error)


def test_a_label_that_training_never_saw_is_named(tmp_path):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\na,x\nb,y\nc,x\n")
    test.write_text("text,label\nd,x\ne,maybe\nf,maybe\n")
    with pytest.raises(ValueError, match=rf"{test}: label 'maybe' \(rows 2, 3 .*\) never appears in the training "
                       "data, which has x, y") as error:
        load_classification_data(train_file=train, test_file=test)
    one_line(error)
    with pytest.raises(ValueError, match=r"--validation_file|--train_file .* or --dataset_name"):
        load_classification_data()


def test_true_and_false_labels_keep_their_names(tmp_path):
    path = tmp_path / "flags.csv"
    path.write_text("text,label\na,true\nb,false\nc,True\n")
    data = load_classification_data(train_file=path)
    assert data["train"].features["label"].names == ["false", "true"] and data["train"]["label"] == [1, 0, 1]


def test_labels_of_two_kinds_are_named_where_they_are(tmp_path):
    mixed = tmp_path / "mixed.json"
    mixed.write_text('[{"text": "a", "label": 1}, {"text": "b", "label": "spam"}]')
    with pytest.raises(ValueError, match=rf"{mixed}: the labels mix numbers and text") as error:
        load_classification_data(train_file=mixed)
    one_line(error)
    several = tmp_path / "several.jsonl"
    several.write_text('{"text": "a", "label": ["x", "y"]}\n{"text": "b", "label": ["x"]}\n')
    with pytest.raises(ValueError, match=rf"{several}: each label must be one string or integer, got List") as error:
        load_classification_data(train_file=several)
    one_line(error)
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\na,pos\nb,neg\nc,pos\n")
    test.write_text("text,label\nd,0\ne,1\n")
    with pytest.raises(ValueError, match=rf"{test} has numbers for labels where {train} has text") as error:
        load_classification_data(train_file=train, test_file=test)
    one_line(error)


def test_long_texts_are_cut_to_the_context_with_a_warning_that_counts_them(gpt2):
    splits = DatasetDict(
        train=Dataset.from_dict({"text": ["word " * 50, "short", "word " * 20], "label": [0, 1, 0]}),
        test=Dataset.from_dict({"text": ["word " * 40, "tiny"], "label": [1, 0]}),
    )
    with pytest.warns(UserWarning, match=r"2 of 3 train, 1 of 2 test texts are longer than 16 tokens and were cut"):
        features = classification_features(splits, gpt2, context_length=16)
    assert [len(ids) for ids in features["train"]["input_ids"]] == [16, 1, 16]
    assert features["test"]["label"][:] == [1, 0]
