"""Data for the recipes: local file formats, the held-out validation split, TRL's columns, empty data."""

import pytest
from datasets import Dataset
from recipe_helpers import clm_settings, run_recipe

from hf_moe.training import DataArguments
from hf_moe.training.data import load_train_and_validation, to_sft_columns


def test_parquet_file_with_validation_split_held_out(tmp_path):
    Dataset.from_dict({"text": [f"line {i}" for i in range(50)]}).to_parquet(tmp_path / "train.parquet")
    data = load_train_and_validation(
        DataArguments(train_file=str(tmp_path / "train.parquet"), validation_split_percentage=20)
    )
    assert (len(data["train"]), len(data["validation"])) == (40, 10)
    assert not set(data["train"]["text"]) & set(data["validation"]["text"])


def test_mixed_file_formats_are_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.csv").write_text("text\nx\n")
    config = DataArguments(train_file=str(tmp_path / "a.txt"), validation_file=str(tmp_path / "b.csv"))
    with pytest.raises(ValueError, match="train_file and validation_file must have the same format, got 'text'"):
        load_train_and_validation(config)


def test_instruction_columns_become_prompt_and_completion(tmp_path):
    rows = {"question": ["q1", "q2"], "answer": ["a1", "a2"], "id": [1, 2]}
    Dataset.from_dict(rows).to_json(tmp_path / "train.jsonl")
    config = DataArguments(
        train_file=str(tmp_path / "train.jsonl"),
        validation_file=str(tmp_path / "train.jsonl"),
        prompt_column="question",
        response_column="answer",
    )
    data = to_sft_columns(load_train_and_validation(config), config)
    assert data["train"].column_names == ["prompt", "completion"] and data["train"][0] == {
        "prompt": "q1",
        "completion": "a1",
    }


@pytest.mark.parametrize("name", ["train.txt", "train.jsonl", "train.csv"])
def test_empty_training_file_is_refused_naming_it(tmp_path, name):
    path = tmp_path / name
    path.write_text("text\n" if name.endswith(".csv") else "")
    with pytest.raises(ValueError, match=f"the train data is empty: train_file '{path}' holds no examples"):
        load_train_and_validation(DataArguments(train_file=str(path)))


def test_empty_validation_file_is_refused_by_the_recipe(assets, tmp_path):
    (tmp_path / "validation.txt").write_text("")
    settings = clm_settings(assets, tmp_path / "out", validation_file=str(tmp_path / "validation.txt"))
    with pytest.raises(
        ValueError, match="the validation data is empty: validation_file .*validation.txt' holds no examples"
    ):
        run_recipe("finetune_clm", settings, tmp_path)
    assert not (tmp_path / "out").exists()
