"""Chapter 6, classification metrics: F1, per class and averaged, as an offline `evaluate` module.

scikit-learn's `f1_score` definitions: for a class c, F1 = 2 TP / (2 TP + FP + FN), the harmonic mean of its
precision and recall (0 when c is neither predicted nor a reference). `average="macro"` is the unweighted mean
of the per-class F1 (not the F1 of the mean precision and recall), `"weighted"` the mean weighted by each
class's number of references, `"micro"` the F1 of all the counts pooled, and `None` gives the list per class,
in the order of `labels`.
"""

import datasets
import evaluate
import numpy as np


AVERAGES = ("macro", "micro", "weighted", None)


class F1(evaluate.Metric):
    """F1 of integer class predictions against references."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="F1: 2 TP / (2 TP + FP + FN) per class, averaged over classes (macro, weighted) or pooled.",
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
        if average == "micro":  # 2 TP + FP + FN = predicted + support
            return {"f1": _ratio(2 * true_positives.sum(), predicted.sum() + support.sum())}
        per_class = np.array([_ratio(2 * tp, p + s) for tp, p, s in zip(true_positives, predicted, support)])
        if average is None:
            return {"f1": per_class.tolist()}
        if average == "weighted":
            return {"f1": _ratio((per_class * support).sum(), support.sum())}
        return {"f1": float(per_class.mean()) if len(per_class) else 0.0}


def _ratio(numerator, denominator) -> float:
    """numerator / denominator, and 0 for 0 / 0 (scikit-learn's zero_division default)."""
    return float(numerator / denominator) if denominator else 0.0
