"""``evaluate`` metric modules shipped with hf_moe, so the recipes need no Hub access.

``load_metric("accuracy")`` is ``evaluate.load`` on the module folder inside this package.
"""

import os

import evaluate

METRICS_DIR = os.path.dirname(os.path.abspath(__file__))
METRIC_NAMES = ("accuracy", "f1")


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load one of METRIC_NAMES from this package (never from the Hub)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"metric must be one of {list(METRIC_NAMES)}, got {name!r}")
    return evaluate.load(os.path.join(METRICS_DIR, name), keep_in_memory=True, **kwargs)
