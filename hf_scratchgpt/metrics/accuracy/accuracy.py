"""Chapter 6, classification metrics: accuracy (the book's measure) as an offline `evaluate` module."""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    """The share of predictions equal to their reference label, optionally weighted per example."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Accuracy: the proportion of predictions that equal their reference label.",
            citation="",
            inputs_description="predictions and references: lists of integer class ids; sample_weight: optional.",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, sample_weight=None):
        if sample_weight is None:
            sample_weight = [1.0] * len(references)
        correct = sum(w for p, r, w in zip(predictions, references, sample_weight) if p == r)
        return {"accuracy": float(correct / sum(sample_weight))}
