"""Chapter 7, scoring the responses: exact match, the share of answers equal to the reference, as an `evaluate` module.

The only normalisation is `str.strip()` on both sides: whitespace around the text (spaces, tabs, newlines) is
dropped; case, punctuation and whitespace inside the text count. "Paris." does not match "Paris", nor "paris".
"""

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    """The share of predictions equal to their reference once surrounding whitespace is stripped from both."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=(
                "Exact match: the proportion of predictions equal to their reference after str.strip() on both; "
                "case and punctuation count."
            ),
            citation="",
            inputs_description="predictions and references: lists of strings, one reference per prediction.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("exact match of no predictions: the mean over zero examples is undefined")
        matches = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
        return {"exact_match": matches / len(predictions)}
