"""Data loading for the recipes: local file formats, the held-out validation split, tokenisation and packing."""

import pytest
from datasets import Dataset
from recipe_helpers import build_tokenizer

from hf_moe.training import CausalLMConfig, load_train_and_validation, tokenize_for_causal_lm


def test_parquet_file_with_validation_split_held_out(tmp_path):
    Dataset.from_dict({"text": [f"line {i}" for i in range(50)]}).to_parquet(tmp_path / "train.parquet")
    config = CausalLMConfig(
        model_name_or_path="-",
        output_dir="-",
        train_file=str(tmp_path / "train.parquet"),
        validation_split_percentage=20,
    )
    data = load_train_and_validation(config)
    assert (len(data["train"]), len(data["validation"])) == (40, 10)
    assert not set(data["train"]["text"]) & set(data["validation"]["text"])


def test_mixed_file_formats_are_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.csv").write_text("text\nx\n")
    config = CausalLMConfig(
        model_name_or_path="-",
        output_dir="-",
        train_file=str(tmp_path / "a.txt"),
        validation_file=str(tmp_path / "b.csv"),
    )
    with pytest.raises(ValueError, match="train_file and validation_file must have the same format, got 'text'"):
        load_train_and_validation(config)


def test_instruction_labels_mask_the_prompt_and_packing_fills_blocks(tmp_path):
    tokenizer = build_tokenizer(["question answer"] * 20)
    rows = {"prompt": ["question"] * 6, "response": [" answer"] * 6}
    Dataset.from_dict(rows).to_json(tmp_path / "train.jsonl")
    config = CausalLMConfig(
        model_name_or_path="-",
        output_dir="-",
        train_file=str(tmp_path / "train.jsonl"),
        validation_file=str(tmp_path / "train.jsonl"),
        prompt_column="prompt",
        response_column="response",
        packing=False,
        block_size=64,
    )
    data = tokenize_for_causal_lm(load_train_and_validation(config), tokenizer, config)
    prompt_length = len(tokenizer("question", add_special_tokens=False)["input_ids"])
    example = data["train"][0]
    assert example["labels"][:prompt_length] == [-100] * prompt_length
    assert example["labels"][prompt_length:] == example["input_ids"][prompt_length:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id

    packed_config = CausalLMConfig(**{**config.__dict__, "packing": True, "block_size": 4})
    packed = tokenize_for_causal_lm(load_train_and_validation(packed_config), tokenizer, packed_config)
    total = sum(len(data["train"][i]["input_ids"]) for i in range(len(data["train"])))
    assert all(len(ids) == 4 for ids in packed["train"]["input_ids"]) and len(packed["train"]) == total // 4
