"""Chapters 6 and 7, metrics: accuracy, precision, recall, F1, the confusion matrix, ROUGE-L and exact match load
offline and give the expected numbers."""

import random

import pytest
from rouge_score import rouge_scorer  # in the test extra: the reference for our ROUGE-L

from hf_scratchgpt.metrics import load_metric


# (prediction, reference): case, punctuation, digits, repeats, non-ASCII letters, and empty sides.
HAND_MADE = [
    ("The cat sat on the mat.", "the cat sat on the mat"),
    ("The cat sat on the mat.", "A cat was sitting on a mat!"),
    ("mat the on sat cat the", "the cat sat on the mat"),
    ("The capital of France is Paris.", "Paris"),
    ("Paris", "The capital of France is Paris."),
    ("", "The capital of France is Paris."),
    ("The capital of France is Paris.", ""),
    ("", ""),
    ("   \n\t", "..."),
    ("!!! ???", "no overlap at all"),
    ("completely different words", "no overlap at all"),
    ("It's 3.14, not 22/7.", "its 3 14 not 22 7"),
    ("e-mail: user@example.com", "email user example com"),
    ("Café au lait, naïve résumé", "caf au lait na ve r sum"),
    ("Straße 東京 ÉCOLE", "stra e cole"),
    ("a a a a b", "a b a b a b"),
    ("The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log"),
    ("Fish are cold-blooded.", "Fish are cold-blooded animals."),
    ("1 2 3 4 5 6 7 8 9 10", "10 9 8 7 6 5 4 3 2 1"),
    ("The sun rises in the east.\nIt sets in the west.", "The sun rises in the east and sets in the west."),
]


def random_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Pairs drawn from a small vocabulary, so that common subsequences are long and ties many."""
    rng = random.Random(seed)
    words = ["the", "The", "a", "cat", "CAT", "dog", "sat", "on", "mat", "2", "42", "é", "x-y", "...", "don't"]
    glue = [" ", "  ", ", ", ". ", "\n", "!", "-"]

    def text() -> str:
        return "".join(rng.choice(words) + rng.choice(glue) for _ in range(rng.randint(0, 25)))

    return [(text(), text()) for _ in range(count)]


PAIRS = HAND_MADE + random_pairs(40)


@pytest.fixture(scope="module")
def rouge():
    return load_metric("rouge_l")


@pytest.fixture(scope="module")
def exact_match():
    return load_metric("exact_match")


@pytest.mark.parametrize("prediction,reference", PAIRS)
def test_rouge_l_of_one_pair_is_rouge_scores(rouge, prediction, reference):
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, prediction)["rougeL"]
    result = rouge.compute(predictions=[prediction], references=[reference])
    assert result["rouge_l"] == pytest.approx(expected.fmeasure, abs=1e-12)
    assert result["rouge_l_precision"] == pytest.approx(expected.precision, abs=1e-12)
    assert result["rouge_l_recall"] == pytest.approx(expected.recall, abs=1e-12)


def test_rouge_l_is_the_mean_over_examples(rouge):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = [scorer.score(reference, prediction)["rougeL"] for prediction, reference in PAIRS]
    result = rouge.compute(predictions=[p for p, _ in PAIRS], references=[r for _, r in PAIRS])
    assert result["rouge_l"] == pytest.approx(sum(s.fmeasure for s in expected) / len(PAIRS), abs=1e-12)
    assert result["rouge_l_precision"] == pytest.approx(sum(s.precision for s in expected) / len(PAIRS), abs=1e-12)
    assert result["rouge_l_recall"] == pytest.approx(sum(s.recall for s in expected) / len(PAIRS), abs=1e-12)
    # The random pairs cover the whole range, not only the easy ends.
    assert 0 < result["rouge_l"] < 1 and len({round(s.fmeasure, 6) for s in expected}) > 20


def test_rouge_l_golden_values(rouge):
    # LCS of "the cat sat on the mat" and "a cat was sitting on a mat" is "cat on mat": 3 of 7 and 3 of 6 tokens.
    result = rouge.compute(predictions=["A cat was sitting on a mat!"], references=["The cat sat on the mat."])
    assert result["rouge_l_precision"] == pytest.approx(3 / 7)
    assert result["rouge_l_recall"] == pytest.approx(3 / 6)
    assert result["rouge_l"] == pytest.approx(2 * (3 / 7) * (3 / 6) / (3 / 7 + 3 / 6))
    assert rouge.compute(predictions=["Same, words!"], references=["same words"])["rouge_l"] == 1.0
    assert rouge.compute(predictions=[""], references=["something"])["rouge_l"] == 0.0


def test_exact_match_strips_surrounding_whitespace_only(exact_match):
    predictions = [" Paris\n", "Paris", "paris", "Paris.", "New  York", "\t", "42"]
    references = ["Paris", "\tParis  ", "Paris", "Paris", "New York", "", "42"]
    # matches: 1st, 2nd (stripped), 6th (both empty), 7th; case, punctuation and inner spaces count.
    assert exact_match.compute(predictions=predictions, references=references) == {"exact_match": 4 / 7}


@pytest.mark.parametrize("name", ["rouge_l", "exact_match"])
def test_metric_of_no_predictions_is_refused(name):
    with pytest.raises(ValueError, match="no predictions"):
        load_metric(name).compute(predictions=[], references=[])


def test_accuracy_plain_and_weighted():
    accuracy = load_metric("accuracy")
    assert accuracy.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0]) == {"accuracy": 0.5}
    weighted = accuracy.compute(predictions=[1, 0, 1], references=[1, 1, 1], sample_weight=[1.0, 3.0, 1.0])
    assert weighted["accuracy"] == pytest.approx(2 / 5)


def test_unknown_metric_lists_the_available_ones():
    with pytest.raises(ValueError, match="available: accuracy, confusion_matrix, exact_match, f1, precision, recall, "
                       "rouge_l"):
        load_metric("bleu")


# ----------------------------------------------------------------------------------------------------------
# Classification: precision, recall, F1 and the confusion matrix, checked against counts made by hand

# Three classes, counted by hand (positions are indices into the lists):
#   class 0: references at 0, 3, 5, 6; predicted at 0, 5 (both right): TP 2, FP 0, FN 2 (3 -> 1, 6 -> 2)
#   class 1: references at 1, 4;       predicted at 1, 3 (3 is a 0):    TP 1, FP 1, FN 1 (4 -> 2)
#   class 2: references at 2, 7;       predicted at 2, 4, 6, 7:         TP 2, FP 2, FN 0
#   class 3: never a reference, never predicted (only in `labels`)
PREDICTIONS = [0, 1, 2, 1, 2, 0, 2, 2]
REFERENCES = [0, 1, 2, 0, 1, 0, 0, 2]
PRECISION = [2 / 2, 1 / 2, 2 / 4]  # TP / (TP + FP)
RECALL = [2 / 4, 1 / 2, 2 / 2]  # TP / (TP + FN)
F1 = [2 * 2 / (2 * 2 + 0 + 2), 2 * 1 / (2 * 1 + 1 + 1), 2 * 2 / (2 * 2 + 2 + 0)]  # 2 TP / (2 TP + FP + FN)
SUPPORT = [4, 2, 2]


@pytest.mark.parametrize("name, per_class", [("precision", PRECISION), ("recall", RECALL), ("f1", F1)])
def test_precision_recall_f1_are_scikit_learns(name, per_class):
    metric = load_metric(name)
    data = dict(predictions=PREDICTIONS, references=REFERENCES)
    assert metric.compute(**data, average=None)[name] == pytest.approx(per_class)
    assert metric.compute(**data)[name] == pytest.approx(sum(per_class) / 3)  # macro is the default
    weighted = sum(s * m for s, m in zip(SUPPORT, per_class)) / sum(SUPPORT)
    assert metric.compute(**data, average="weighted")[name] == pytest.approx(weighted)
    # Pooled over classes, every wrong prediction is one FP and one FN: micro P = R = F1 = accuracy = 5 / 8.
    assert metric.compute(**data, average="micro")[name] == pytest.approx(5 / 8)
    # A class in `labels` that never occurs scores 0 (scikit-learn's zero_division) and counts in the macro mean.
    with_absent = metric.compute(**data, labels=[0, 1, 2, 3], average=None)[name]
    assert with_absent == pytest.approx([*per_class, 0.0])
    assert metric.compute(**data, labels=[0, 1, 2, 3])[name] == pytest.approx(sum(per_class) / 4)
    with pytest.raises(ValueError, match="average must be one of"):
        metric.compute(**data, average="binary")


def test_macro_f1_is_the_mean_of_per_class_f1_not_the_f1_of_the_means():
    f1 = load_metric("f1").compute(predictions=PREDICTIONS, references=REFERENCES)["f1"]
    precision, recall = sum(PRECISION) / 3, sum(RECALL) / 3
    assert f1 == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert f1 != pytest.approx(2 * precision * recall / (precision + recall))


def test_confusion_matrix_rows_are_references_columns_predictions():
    matrix = load_metric("confusion_matrix").compute(predictions=PREDICTIONS, references=REFERENCES)
    assert matrix == {"confusion_matrix": [[2, 1, 1], [0, 1, 1], [0, 0, 2]]}
    matrix = load_metric("confusion_matrix").compute(predictions=[1, 1], references=[1, 1], labels=[0, 1])
    assert matrix == {"confusion_matrix": [[0, 0], [0, 2]]}
