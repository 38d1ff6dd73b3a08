"""F1 score: binary (of ``pos_label``), or the unweighted mean of per-class F1 (``average="macro"``)."""

import datasets
import evaluate

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall); macro averaging takes the mean over the classes."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    average (str): "binary" (default; F1 of pos_label) or "macro" (mean over the labels that occur).
    pos_label (int): the positive class for binary F1 (default 1).
Returns:
    f1 (float): in [0, 1]. A class with no predicted and no true example is left out of the macro mean.
"""


def _f1(predictions, references, label) -> float:
    true_positive = sum(1 for p, r in zip(predictions, references, strict=True) if p == label and r == label)
    predicted = sum(1 for p in predictions if p == label)
    actual = sum(1 for r in references if r == label)
    if predicted + actual == 0:
        return 0.0
    return 2 * true_positive / (predicted + actual)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        if average == "binary":
            return {"f1": _f1(predictions, references, pos_label)}
        if average != "macro":
            raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")
        labels = sorted(set(predictions) | set(references))
        return {"f1": sum(_f1(predictions, references, label) for label in labels) / len(labels) if labels else 0.0}
