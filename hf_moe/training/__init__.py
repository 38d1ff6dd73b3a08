"""Fine-tuning hf_moe models with transformers' `Trainer` and TRL's `SFTTrainer`.

For any trainer: `MoeCallback` (router terms, routing health, evaluation without the router terms, the
overfitting gap, plots) and `MoeSFTTrainer` / `MoeSFTConfig` (TRL's SFT trainer with the model's own
loss). For a recipe (``recipes/finetune_clm.py`` reads top to bottom): the options (`MoeArguments`,
`DataArguments`, `ClassificationDataArguments`, `MoeTrainingArguments`), and the run around the
trainer: `prepare_run`, `load_sft_dataset` / `load_classification_dataset`, `load_model`,
`prepare_trainer`, `finish_run`, and `run_recipe_main` for the command line. Everything else is
importable from its module (``hf_moe.training.data``, ``.outputs``, ``.trainable``, ...) and may change.
"""

from . import requires_train_extra  # noqa: F401  (first: names a missing [train] extra)
from .arguments import ClassificationDataArguments, DataArguments, MoeArguments, MoeTrainingArguments
from .callback import MoeCallback
from .data import load_classification_dataset, load_sft_dataset
from .entry_point import run_recipe_main
from .model_loading import load_model
from .run import finish_run, prepare_run, prepare_trainer
from .trainers import MoeSFTConfig, MoeSFTTrainer

__all__ = [
    # For any Trainer / TRL script.
    "MoeCallback",
    "MoeSFTConfig",
    "MoeSFTTrainer",
    # The options of a recipe.
    "ClassificationDataArguments",
    "DataArguments",
    "MoeArguments",
    "MoeTrainingArguments",
    # A recipe, top to bottom.
    "prepare_run",
    "load_sft_dataset",
    "load_classification_dataset",
    "load_model",
    "prepare_trainer",
    "finish_run",
    "run_recipe_main",
]
