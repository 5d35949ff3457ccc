"""Chapter 6, classification metrics: the confusion matrix as an offline `evaluate` module.

scikit-learn's `confusion_matrix`: entry [i][j] counts the examples whose reference is class `labels[i]` and
whose prediction is class `labels[j]`; rows are references, columns predictions, the diagonal is right.
"""

import datasets
import evaluate
import numpy as np


class ConfusionMatrix(evaluate.Metric):
    """Counts of (reference, prediction) pairs of integer class ids."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Confusion matrix: rows are the reference classes, columns the predicted ones.",
            citation="",
            inputs_description="predictions, references: integer class ids; labels: the classes, in the order of "
            "the rows and columns (default: those that occur, sorted).",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if labels is None:
            labels = np.union1d(predictions, references)
        matrix = [[int(np.sum((references == r) & (predictions == p))) for p in labels] for r in labels]
        return {"confusion_matrix": matrix}
