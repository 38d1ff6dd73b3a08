"""Classification metrics of the recipes: plain functions of predicted and true labels.

Both return a dict, so a ``compute_metrics`` of transformers' `Trainer` can merge them.
"""

__all__ = ["accuracy", "f1"]


def accuracy(predictions: list[int], references: list[int]) -> dict[str, float]:
    """The fraction of predictions equal to their reference label, in [0, 1]."""
    correct = sum(int(p == r) for p, r in zip(predictions, references, strict=True))
    return {"accuracy": correct / len(references) if references else 0.0}


def f1(predictions: list[int], references: list[int], average: str = "binary", pos_label: int = 1) -> dict[str, float]:
    """F1 = 2 * precision * recall / (precision + recall), in [0, 1].

    ``average="binary"``: the F1 of ``pos_label``. ``average="macro"``: the unweighted mean of the
    per-class F1 over the labels that occur in either list.
    """
    if average == "binary":
        return {"f1": _f1(predictions, references, pos_label)}
    if average != "macro":
        raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")
    labels = sorted(set(predictions) | set(references))
    return {"f1": sum(_f1(predictions, references, label) for label in labels) / len(labels) if labels else 0.0}


def _f1(predictions: list[int], references: list[int], label: int) -> float:
    pairs = list(zip(predictions, references, strict=True))
    true_positive = sum(1 for p, r in pairs if p == label and r == label)
    predicted = sum(1 for p, _ in pairs if p == label)
    actual = sum(1 for _, r in pairs if r == label)
    return 2 * true_positive / (predicted + actual) if predicted + actual else 0.0
