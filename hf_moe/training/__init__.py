"""Fine-tuning hf_moe models with transformers' `Trainer` and TRL's `SFTTrainer`: the MoE callback,
the SFT trainer that keeps the router terms, and the pieces the recipes in ``recipes/`` share
(options, data, model loading, parameter selection, output folder, model card, Hub upload)."""

from . import requires_train_extra  # noqa: F401  (first: names a missing [train] extra)
from .arguments import ClassificationDataArguments, DataArguments, MoeArguments, MoeTrainingArguments
from .callback import MoeCallback
from .data import check_columns, label_names, load_train_and_validation, to_sft_columns, tokenize_for_classification
from .entry_point import run_recipe_main
from .model_loading import check_process_group, fit_length_to_positions, load_model_for_finetuning
from .outputs import (
    CompleteCheckpoints,
    add_training_subset,
    check_checkpoint,
    check_output_dir,
    finish_run,
    prepare_run,
    resolve_checkpoint,
)
from .publish import push_folder_to_hub, save_model_folder, write_model_card
from .routing_health import load_balance, plot_expert_load
from .trainable import classifier_head_names, moe_parameter_names, router_parameter_names, select_trainable_parameters
from .trainers import MoeSFTConfig, MoeSFTTrainer, is_moe_model

__all__ = [
    "add_training_subset",
    "ClassificationDataArguments",
    "CompleteCheckpoints",
    "DataArguments",
    "MoeArguments",
    "MoeCallback",
    "MoeSFTConfig",
    "MoeTrainingArguments",
    "MoeSFTTrainer",
    "check_checkpoint",
    "check_columns",
    "check_output_dir",
    "check_process_group",
    "classifier_head_names",
    "finish_run",
    "fit_length_to_positions",
    "is_moe_model",
    "label_names",
    "load_balance",
    "load_model_for_finetuning",
    "load_train_and_validation",
    "moe_parameter_names",
    "plot_expert_load",
    "prepare_run",
    "push_folder_to_hub",
    "resolve_checkpoint",
    "router_parameter_names",
    "run_recipe_main",
    "save_model_folder",
    "select_trainable_parameters",
    "to_sft_columns",
    "tokenize_for_classification",
    "write_model_card",
]
