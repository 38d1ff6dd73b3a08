"""The recipes' classification metrics compute the right values."""

import pytest

from hf_moe.metrics import accuracy, f1


def test_accuracy():
    assert accuracy(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0]) == {"accuracy": 0.5}


def test_f1_binary_and_macro():
    predictions, references = [1, 0, 1, 1, 2], [1, 1, 0, 1, 2]
    # class 1: tp 2, predicted 3, actual 3 -> 2/3; class 0: 0; class 2: 1.
    assert f1(predictions, references, average="binary")["f1"] == pytest.approx(2 / 3)
    assert f1(predictions, references, average="binary", pos_label=2)["f1"] == pytest.approx(1.0)
    assert f1(predictions, references, average="macro")["f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)


def test_unknown_average_names_the_choices():
    with pytest.raises(ValueError, match=r"average must be 'binary' or 'macro', got 'micro'"):
        f1([1], [1], average="micro")


def test_lengths_must_match():
    with pytest.raises(ValueError):
        accuracy([1, 0], [1])
