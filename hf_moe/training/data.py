"""Data for the recipes through ``datasets.load_dataset``: local files or Hub names, a validation
split taken from the training data when none is given, the columns TRL expects, classification
tokenisation. A recipe calls `load_sft_dataset` or `load_classification_dataset`."""

import os

from datasets import DatasetDict, load_dataset

from .arguments import DATA_FILE_BUILDERS


def load_sft_dataset(config, seed: int = 42) -> DatasetDict:
    """``{"train", "validation"}`` (`load_train_and_validation`) with the columns TRL's SFTTrainer reads
    (`to_sft_columns`); ``config``: a `DataArguments`."""
    return to_sft_columns(load_train_and_validation(config, seed), config)


def load_classification_dataset(config, tokenizer, seed: int = 42) -> tuple[DatasetDict, list[str]]:
    """Tokenized ``{"train", "validation"}`` (`load_train_and_validation`, `tokenize_for_classification`)
    and the label names in label-id order (`label_names`); ``config``: a `ClassificationDataArguments`.
    A configured column missing from the data is an error naming the option and the columns there."""
    raw = load_train_and_validation(config, seed)
    check_columns(raw, text_column=config.text_column, text_pair_column=config.text_pair_column)
    check_columns(raw, label_column=config.label_column)
    names = label_names(raw, config.label_column)
    return tokenize_for_classification(raw, tokenizer, config, names), names


def load_train_and_validation(config, seed: int = 42) -> DatasetDict:
    """``{"train", "validation"}`` from ``config`` (a `DataArguments`).

    Local files pick their builder from the extension (json/jsonl/csv/text/parquet). Without a
    validation file or split, ``validation_split_percentage`` of the training data is held out
    (seeded with ``seed``). An empty training or validation set is an error naming its source.
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
        for split, path in files.items():
            _check_file_not_empty(path, f"{split if split == 'validation' else 'train'}_file", builder)
        raw = load_files(builder, files)
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
        _check_not_empty(raw[train_split], "train", config)
        held_out = raw[train_split].train_test_split(test_size=config.validation_split_percentage / 100, seed=seed)
        data = DatasetDict(train=held_out["train"], validation=held_out["test"])
    else:
        data = DatasetDict(train=raw[train_split], validation=raw[validation_split])
    if config.max_train_samples is not None:
        data["train"] = data["train"].select(range(min(config.max_train_samples, len(data["train"]))))
    if config.max_eval_samples is not None:
        data["validation"] = data["validation"].select(range(min(config.max_eval_samples, len(data["validation"]))))
    for split, dataset in data.items():
        _check_not_empty(dataset, split, config)
    return data


def _check_file_not_empty(path: str, name: str, builder: str) -> None:
    """A local data file without a single example (only a CSV header counts as empty too)."""
    if builder == "parquet":
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    if len(lines) <= (1 if builder == "csv" else 0):
        split = "validation" if name == "validation_file" else "train"
        raise ValueError(f"the {split} data is empty: {name} {path!r} holds no examples")


def load_files(builder: str, files: dict[str, str]) -> DatasetDict:
    """``load_dataset`` of local files; files whose columns differ are one error naming both files and
    their columns (datasets reports it as a long ``DatasetGenerationCastError`` / ``DatasetGenerationError``)."""
    from datasets.exceptions import DatasetGenerationError  # the json builder raises its CastError subclass

    try:
        return load_dataset(builder, data_files=files)
    except DatasetGenerationError:
        if len(files) < 2:
            raise
        features = {
            split: load_dataset(builder, data_files={split: path})[split].features for split, path in files.items()
        }
        if len({repr(f) for f in features.values()}) == 1:
            raise  # not a column mismatch
    same_names = len({tuple(f) for f in features.values()}) == 1  # then the types differ

    def describe(split: str) -> str:
        if same_names:
            return "column types " + str({name: str(getattr(t, "dtype", t)) for name, t in features[split].items()})
        return f"columns {list(features[split])}"

    described = "; ".join(f"{split}_file {path!r} has {describe(split)}" for split, path in files.items())
    raise ValueError(f"train_file and validation_file must have the same columns: {described}")


def data_source(config, split: str) -> str:
    """Where the ``split`` data comes from, in the recipe's option names."""
    source = {"train": config.train_file, "validation": config.validation_file}.get(split)
    if source is not None:
        return f"{'train_file' if split == 'train' else 'validation_file'} {source!r}"
    if split == "validation" and config.validation_split is None and config.train_file is not None:
        return f"train_file {config.train_file!r} (held-out part)"
    name = "train_split" if split == "train" else "validation_split"
    return f"{config.dataset_name!r} ({name} {getattr(config, name) or split!r})"


def _check_not_empty(dataset, split: str, config) -> None:
    if len(dataset) > 0:
        return
    raise ValueError(f"the {split} data is empty: {data_source(config, split)} holds no examples")


def to_sft_columns(data: DatasetDict, config) -> DatasetDict:
    """The columns TRL's SFTTrainer reads: ``text`` (language modelling), or ``prompt`` and ``completion``
    (instruction data, loss on the completion only); other columns are dropped."""
    if config.prompt_column is not None:
        check_columns(data, prompt_column=config.prompt_column, response_column=config.response_column)
        columns = {config.prompt_column: "prompt", config.response_column: "completion"}
    else:
        check_columns(data, text_column=config.text_column)
        columns = {config.text_column: "text"}
    data = data.select_columns(list(columns))
    return data.rename_columns({k: v for k, v in columns.items() if k != v})


def check_columns(data: DatasetDict, **columns: str | None) -> None:
    """Fail with the key name and the available columns when a configured column is missing."""
    for split, dataset in data.items():
        for key, column in columns.items():
            if column is not None and column not in dataset.column_names:
                raise ValueError(
                    f"{key} {column!r} not found in the {split} data; its columns are {dataset.column_names}"
                )


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
    for split, dataset in data.items():
        values = dataset[config.label_column]
        if hasattr(feature, "names"):  # ClassLabel indices (-1 marks unlabelled examples in Hub test splits)
            unknown = sorted({v for v in values if not 0 <= v < len(names)})
        else:
            unknown = sorted({str(v) for v in values} - set(to_index))
        if unknown:
            raise ValueError(
                f"{config.label_column} values {unknown[:10]} in the {split} data ({data_source(config, split)}) are "
                f"not labels of the training data: num_labels is {len(names)} ({names})"
            )

    def tokenize(batch):
        pair = batch[config.text_pair_column] if config.text_pair_column is not None else None
        encoded = tokenizer(batch[config.text_column], pair, truncation=True, max_length=config.max_length)
        raw_labels = batch[config.label_column]
        if hasattr(feature, "names"):
            labels = list(raw_labels)
        else:
            labels = [to_index[str(v)] for v in raw_labels]
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}

    return data.map(tokenize, batched=True, remove_columns=data["train"].column_names, desc="Tokenizing")
