"""Chapters 6 and 7, metrics: `evaluate` modules shipped with the package, so that they load without the Hub.

`evaluate.load("accuracy")` fetches its script from the Hub; `load_metric("accuracy")` loads the copy here.
"""

from pathlib import Path

import evaluate


METRICS_DIR = Path(__file__).parent


def load_metric(name: str) -> evaluate.EvaluationModule:
    """A metric of this folder (`accuracy`), loaded offline by `evaluate`."""
    available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
    if name not in available:
        raise ValueError(f"no metric {name!r} in hf_scratchgpt.metrics; available: {', '.join(available)}")
    return evaluate.load(str(METRICS_DIR / name))


__all__ = ["load_metric"]
