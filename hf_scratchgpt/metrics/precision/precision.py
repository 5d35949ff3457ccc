"""Chapter 6, classification metrics: precision, per class and averaged, as an offline `evaluate` module.

scikit-learn's `precision_score` definitions: for a class c, precision = TP / (TP + FP), the share of the
predictions of c that are right (0 when c is never predicted). `average="macro"` is the unweighted mean over
the classes, `"weighted"` the mean weighted by each class's number of references, `"micro"` the precision of
all the counts pooled, and `None` gives the list per class, in the order of `labels`.
"""

import datasets
import evaluate
import numpy as np


AVERAGES = ("macro", "micro", "weighted", None)


class Precision(evaluate.Metric):
    """Precision of integer class predictions against references."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Precision: TP / (TP + FP) per class, averaged over classes (macro, weighted) or pooled.",
            citation="",
            inputs_description="predictions, references: integer class ids; labels: the classes to count "
            "(default: those that occur, sorted); average: macro (default), micro, weighted or None (per class).",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None, average="macro"):
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
        predictions, references = np.asarray(predictions), np.asarray(references)
        if labels is None:
            labels = np.union1d(predictions, references)
        labels = np.asarray(labels)
        true_positives = np.array([np.sum((predictions == c) & (references == c)) for c in labels], dtype=float)
        predicted = np.array([np.sum(predictions == c) for c in labels], dtype=float)
        support = np.array([np.sum(references == c) for c in labels], dtype=float)
        if average == "micro":
            return {"precision": _ratio(true_positives.sum(), predicted.sum())}
        per_class = np.array([_ratio(tp, n) for tp, n in zip(true_positives, predicted)])
        if average is None:
            return {"precision": per_class.tolist()}
        if average == "weighted":
            return {"precision": _ratio((per_class * support).sum(), support.sum())}
        return {"precision": float(per_class.mean()) if len(per_class) else 0.0}


def _ratio(numerator, denominator) -> float:
    """numerator / denominator, and 0 for 0 / 0 (scikit-learn's zero_division default)."""
    return float(numerator / denominator) if denominator else 0.0
