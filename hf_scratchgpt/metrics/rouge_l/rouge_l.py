"""Chapter 7, scoring the responses: ROUGE-L, the longest common subsequence of words, as an offline `evaluate` module.

The numbers are those of Google's `rouge-score` package with its defaults
(`rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)`), the usual ROUGE-L of papers and of the Hub's
`rouge` metric, computed here without that package.
"""

import re

import datasets
import evaluate


_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """`rouge-score`'s default tokens: lowercase, every run of characters other than a-z and 0-9 is a space.

    Accented and non-Latin letters are separators too, as there: "Café au lait" gives ["caf", "au", "lait"].
    """
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """The length of the longest common subsequence of two token lists: dynamic programming, one row at a time."""
    if len(a) < len(b):
        a, b = b, a  # the row is the shorter list
    row = [0] * (len(b) + 1)
    for token in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, other in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if token == other else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: str, reference: str) -> tuple[float, float, float]:
    """Precision, recall and F-measure of one pair; all 0.0 when either side has no token (as `rouge-score`)."""
    predicted, target = tokenize(prediction), tokenize(reference)
    if not predicted or not target:
        return 0.0, 0.0, 0.0
    common = lcs_length(target, predicted)
    precision, recall = common / len(predicted), common / len(target)
    fmeasure = 2 * precision * recall / (precision + recall) if common else 0.0
    return precision, recall, fmeasure


class RougeL(evaluate.Metric):
    """ROUGE-L F-measure, precision and recall of each prediction against its reference, averaged over examples."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=(
                "ROUGE-L: precision, recall and F-measure of the longest common subsequence of words between a "
                "prediction and its reference, averaged over examples; tokens as rouge-score's defaults."
            ),
            citation=(
                "Lin, Chin-Yew. ROUGE: A Package for Automatic Evaluation of Summaries. "
                "Text Summarization Branches Out, 2004."
            ),
            inputs_description="predictions and references: lists of strings, one reference per prediction.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("ROUGE-L of no predictions: the mean over zero examples is undefined")
        scores = [rouge_l(prediction, reference) for prediction, reference in zip(predictions, references)]
        precision, recall, fmeasure = (sum(column) / len(scores) for column in zip(*scores))
        return {"rouge_l": fmeasure, "rouge_l_precision": precision, "rouge_l_recall": recall}
