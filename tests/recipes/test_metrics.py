"""The evaluate metric modules shipped inside hf_moe load offline and compute the right values."""

import pytest

from hf_moe.metrics import load_metric


def test_accuracy():
    assert load_metric("accuracy").compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0]) == {"accuracy": 0.5}


def test_f1_binary_and_macro():
    predictions, references = [1, 0, 1, 1, 2], [1, 1, 0, 1, 2]
    f1 = load_metric("f1")
    # class 1: tp 2, predicted 3, actual 3 -> 2/3; class 0: 0; class 2: 1.
    assert f1.compute(predictions=predictions, references=references, average="binary")["f1"] == pytest.approx(2 / 3)
    assert f1.compute(predictions=predictions, references=references, average="macro")["f1"] == pytest.approx(
        (2 / 3 + 0 + 1) / 3
    )


def test_unknown_metric_names_the_choices():
    with pytest.raises(ValueError, match=r"metric must be one of \['accuracy', 'f1'\], got 'bleu'"):
        load_metric("bleu")
