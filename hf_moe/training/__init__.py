"""Shared pieces of the fine-tuning recipes in ``recipes/``: strict settings, data, model loading,
parameter selection, routing health and the output folder (model, card, Hub upload)."""

from .callback import MoeCallback
from .config import CausalLMConfig, ClassificationConfig, FinetuneConfig, LoraOptions, UpcycleOptions, parse_recipe_args
from .data import (
    check_columns,
    label_names,
    load_train_and_validation,
    tokenize_for_causal_lm,
    tokenize_for_classification,
)
from .model_loading import check_process_group, load_model_for_finetuning
from .publish import push_folder_to_hub, save_model_folder, write_model_card
from .routing_health import RoutingHealth, flatten_routing_summary, format_routing_summary, plot_expert_load
from .trainable import classifier_head_names, moe_parameter_names, router_parameter_names, select_trainable_parameters
from .trainers import MoeSFTTrainer

__all__ = [
    "CausalLMConfig",
    "ClassificationConfig",
    "FinetuneConfig",
    "LoraOptions",
    "MoeCallback",
    "MoeSFTTrainer",
    "RoutingHealth",
    "UpcycleOptions",
    "check_columns",
    "check_process_group",
    "classifier_head_names",
    "flatten_routing_summary",
    "format_routing_summary",
    "label_names",
    "load_model_for_finetuning",
    "load_train_and_validation",
    "moe_parameter_names",
    "parse_recipe_args",
    "plot_expert_load",
    "push_folder_to_hub",
    "router_parameter_names",
    "save_model_folder",
    "select_trainable_parameters",
    "tokenize_for_causal_lm",
    "tokenize_for_classification",
    "write_model_card",
]
