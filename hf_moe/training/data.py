"""Data for the recipes through ``datasets.load_dataset``: local files or Hub names, a validation
split taken from the training data when none is given, tokenisation and packing."""

import os
from itertools import chain

from datasets import DatasetDict, load_dataset

from .config import DATA_FILE_BUILDERS


def load_train_and_validation(config) -> DatasetDict:
    """``{"train", "validation"}`` from ``config`` (a FinetuneConfig).

    Local files pick their builder from the extension (json/jsonl/csv/text/parquet). Without a
    validation file or split, ``validation_split_percentage`` of the training data is held out
    (seeded with ``config.seed``).
    """
    if config.train_file is not None:
        builder = DATA_FILE_BUILDERS[os.path.splitext(config.train_file)[1]]
        files = {"train": config.train_file}
        if config.validation_file is not None:
            other = DATA_FILE_BUILDERS[os.path.splitext(config.validation_file)[1]]
            if other != builder:
                raise ValueError(
                    f"train_file and validation_file must have the same format, got {builder!r} "
                    f"({config.train_file!r}) and {other!r} ({config.validation_file!r})"
                )
            files["validation"] = config.validation_file
        raw = load_dataset(builder, data_files=files)
        train_split = "train"
    else:
        raw = load_dataset(config.dataset_name, config.dataset_config_name)
        train_split = config.train_split
    if train_split not in raw:
        raise ValueError(f"train_split {train_split!r} not found in {config.dataset_name!r}; splits: {list(raw)}")
    validation_split = config.validation_split or ("validation" if "validation" in raw else None)
    if config.validation_split is not None and config.validation_split not in raw:
        raise ValueError(f"validation_split {config.validation_split!r} not found; splits: {list(raw)}")
    if validation_split is None:
        held_out = raw[train_split].train_test_split(
            test_size=config.validation_split_percentage / 100, seed=config.seed
        )
        data = DatasetDict(train=held_out["train"], validation=held_out["test"])
    else:
        data = DatasetDict(train=raw[train_split], validation=raw[validation_split])
    if config.max_train_samples is not None:
        data["train"] = data["train"].select(range(min(config.max_train_samples, len(data["train"]))))
    if config.max_eval_samples is not None:
        data["validation"] = data["validation"].select(range(min(config.max_eval_samples, len(data["validation"]))))
    return data


def check_columns(data: DatasetDict, **columns: str | None) -> None:
    """Fail with the key name and the available columns when a configured column is missing."""
    for split, dataset in data.items():
        for key, column in columns.items():
            if column is not None and column not in dataset.column_names:
                raise ValueError(
                    f"{key} {column!r} not found in the {split} data; its columns are {dataset.column_names}"
                )


def tokenize_for_causal_lm(data: DatasetDict, tokenizer, config) -> DatasetDict:
    """input_ids and labels for causal LM training.

    Text data: labels = input_ids. Instruction data (``prompt_column`` + ``response_column``):
    prompt tokens get label -100, so the loss is on the response only. Each example ends with EOS.
    ``packing``: concatenate everything and cut it into ``block_size`` chunks (no padding);
    otherwise truncate each example to ``block_size`` (the collator pads).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        if config.prompt_column is not None:
            prompts = tokenizer(batch[config.prompt_column], add_special_tokens=False)["input_ids"]
            responses = tokenizer(batch[config.response_column], add_special_tokens=False)["input_ids"]
            input_ids = [p + r + eos for p, r in zip(prompts, responses, strict=True)]
            labels = [[-100] * len(p) + r + eos for p, r in zip(prompts, responses, strict=True)]
        else:
            input_ids = [
                ids + eos for ids in tokenizer(batch[config.text_column], add_special_tokens=False)["input_ids"]
            ]
            labels = [list(ids) for ids in input_ids]
        return {"input_ids": input_ids, "labels": labels}

    columns = data["train"].column_names
    tokenized = data.map(tokenize, batched=True, remove_columns=columns, desc="Tokenizing")
    block = config.block_size

    def pack(batch):
        # Concatenate the batch's examples and cut into block_size chunks; the remainder is dropped.
        ids = list(chain.from_iterable(batch["input_ids"]))
        labels = list(chain.from_iterable(batch["labels"]))
        usable = len(ids) // block * block
        return {
            "input_ids": [ids[i : i + block] for i in range(0, usable, block)],
            "labels": [labels[i : i + block] for i in range(0, usable, block)],
        }

    def truncate(batch):
        return {key: [seq[:block] for seq in batch[key]] for key in ("input_ids", "labels")}

    if config.packing:
        tokenized = tokenized.map(pack, batched=True, batch_size=1000, desc=f"Packing into blocks of {block}")
    else:
        tokenized = tokenized.map(truncate, batched=True, desc=f"Truncating to {block}")
    for split, dataset in tokenized.items():
        if len(dataset) == 0:
            raise ValueError(
                f"the {split} data holds fewer than block_size={block} tokens; lower block_size or add data"
            )
    return tokenized


def label_names(data: DatasetDict, label_column: str) -> list[str]:
    """Label names: the dataset's ClassLabel names, or the sorted distinct values of the training labels."""
    feature = data["train"].features[label_column]
    if hasattr(feature, "names"):
        return list(feature.names)
    values = sorted(set(data["train"][label_column]))
    return [str(v) for v in values]


def tokenize_for_classification(data: DatasetDict, tokenizer, config, names: list[str]) -> DatasetDict:
    """input_ids, attention_mask and integer labels (index into ``names``); truncated to max_length."""
    feature = data["train"].features[config.label_column]
    to_index = {name: i for i, name in enumerate(names)}

    def tokenize(batch):
        pair = batch[config.text_pair_column] if config.text_pair_column is not None else None
        encoded = tokenizer(batch[config.text_column], pair, truncation=True, max_length=config.max_length)
        raw_labels = batch[config.label_column]
        if hasattr(feature, "names"):
            labels = list(raw_labels)
        else:
            unknown = sorted({str(v) for v in raw_labels} - set(to_index))
            if unknown:
                raise ValueError(
                    f"{config.label_column} values {unknown} do not occur in the training data (labels: {names})"
                )
            labels = [to_index[str(v)] for v in raw_labels]
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}

    return data.map(tokenize, batched=True, remove_columns=data["train"].column_names, desc="Tokenizing")
