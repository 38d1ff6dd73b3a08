"""Load the model a recipe fine-tunes: an hf_moe checkpoint, or a dense checkpoint upcycled on the fly,
with the recipe's MoE and dropout options applied to the config before the modules are built."""

import torch
from transformers import AutoConfig, DistributedConfig
from transformers.utils import logging

from hf_moe.modeling.registry import routing_method_of

logger = logging.get_logger("hf_moe.training")

# Dropout fields of dense decoder configs across architectures (llama/qwen/mistral: attention_dropout;
# gpt2: resid/embd/attn_pdrop; others: hidden_dropout, dropout).
BACKBONE_DROPOUT_FIELDS = (
    "attention_dropout",
    "hidden_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
)


def set_backbone_dropout(dense_config, rate: float) -> list[str]:
    """Set every dropout field the dense config has; returns their names (ValueError if none)."""
    names = [name for name in BACKBONE_DROPOUT_FIELDS if isinstance(getattr(dense_config, name, None), (int, float))]
    if not names:
        raise ValueError(
            f"backbone_dropout: model_type {dense_config.model_type!r} has none of the dropout fields "
            f"{list(BACKBONE_DROPOUT_FIELDS)}"
        )
    for name in names:
        setattr(dense_config, name, rate)
    return names


def distributed_kwargs(config) -> dict:
    """``from_pretrained``'s ``distributed_config`` from `MoeArguments.distributed_config` (empty without one)."""
    if config.distributed_config is None:
        return {}
    try:
        return {"distributed_config": DistributedConfig(**config.distributed_config)}
    except ValueError as error:
        raise ValueError(f"distributed_config {config.distributed_config}: {error}") from error


def load_model_for_finetuning(config, auto_class, **head_fields):
    """Build the model of ``auto_class``'s head from ``config.model_name_or_path`` (a `MoeArguments`).

    An hf_moe checkpoint, or a dense one upcycled on the fly (``upcycle``); with
    ``dense_control`` the dense model itself, with the same dropout. ``head_fields`` (num_labels,
    id2label, label2id, pad_token_id) go on the config that builds the head. The MoE options are set
    on the MoE config before construction, so capacity factors and expert dropout reach the modules.
    Weights load in float32; mixed precision is the trainer's. With ``distributed_config`` transformers
    shards the model while it loads (FSDP2, expert or tensor parallelism) and the Trainer leaves it as is.
    """
    source = AutoConfig.from_pretrained(config.model_name_or_path)
    is_moe = routing_method_of(source) is not None
    dense_config = source.text_config if is_moe else source
    for name, value in head_fields.items():
        setattr(dense_config, name, value)
        if is_moe:
            setattr(source, name, value)
    if config.backbone_dropout is not None:
        set_backbone_dropout(dense_config, config.backbone_dropout)
    options = config.routing_values()  # the MoE options set; None keeps the checkpoint's

    if is_moe:
        if config.upcycle is not None:
            raise ValueError(
                f"upcycle is set but model_name_or_path {config.model_name_or_path!r} is already an MoE "
                f"model ({source.model_type!r}); remove upcycle"
            )
        unknown = [name for name in options if not hasattr(source, name)]
        if unknown:
            raise ValueError(
                f"{unknown} do not apply to model_type {source.model_type!r}; remove them from the settings"
            )
        # Rebuilding the config re-runs its own validation on the new values.
        source = type(source).from_dict({**source.to_dict(), **options})
        return auto_class.from_pretrained(
            config.model_name_or_path, config=source, dtype=torch.float32, **distributed_kwargs(config)
        )

    if config.upcycle is None:
        raise ValueError(
            f"model_name_or_path {config.model_name_or_path!r} is a dense {source.model_type!r} checkpoint: "
            "set upcycle (e.g. {routing: switch, num_experts: 8, moe_layers: every_other}) to upcycle it on the fly"
        )
    from hf_moe.upcycling import upcycle_model

    dense = auto_class.from_pretrained(
        config.model_name_or_path, config=dense_config, dtype=torch.float32, **distributed_kwargs(config)
    )
    if config.dense_control:
        return dense
    # The upcycler rejects settings the chosen routing does not have, naming them.
    return upcycle_model(dense, config.upcycling_settings())


def position_limit(model) -> tuple[str, int] | None:
    """(field name, value) of the position limit (``max_position_embeddings`` / ``n_positions``) of a model
    or its config."""
    config = getattr(model, "config", model)
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return getattr(config, "attribute_map", {}).get(name, name), value  # GPT-2 stores n_positions
    return None


def fit_length_to_positions(model, length: int | None, flag: str) -> int | None:
    """``length`` capped at the model's position limit, with a warning naming both when it is lowered."""
    limit = position_limit(model)
    if limit is None or (length is not None and length <= limit[1]):
        return length
    name, value = limit
    logger.warning(f"{flag} {length} exceeds the model's {name} ({value}): sequences are truncated to {value} tokens")
    return value


def check_process_group(accelerator) -> None:
    """Fail when the launch asked for something accelerate did not set up: several processes that
    joined no process group (they would train independently), or FSDP that fell back to DDP
    (accelerate 1.15 and 1.16 enable FSDP only on accelerator devices, not for CPU processes)."""
    import os

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        raise ValueError(
            f"{world_size} processes were launched but accelerate set up distributed_type "
            f"{accelerator.distributed_type.value!r} with 1 process each"
        )
    if (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        and accelerator.distributed_type.value != "FSDP"
    ):
        raise ValueError(
            f"the accelerate config asks for FSDP but accelerate set up {accelerator.distributed_type.value!r}: "
            "accelerate enables FSDP only on GPUs (or other accelerators), not for CPU processes; "
            "on CPUs shard with distributed_config (e.g. '{\"fsdp_size\": 2}' under torchrun) or use "
            "recipes/accelerate/data_parallel.yaml"
        )


def load_model(config, auto_class, labels: list[str] | None = None, **config_fields):
    """The model a recipe fine-tunes, ready for its trainer (``config``: a `MoeArguments`).

    `load_model_for_finetuning` builds it (an hf_moe checkpoint, a dense one upcycled on the fly, or the
    dense control), with a new classification head when ``labels`` (the label names, in label-id order)
    are given; ``config_fields`` (e.g. ``pad_token_id``) go on the config that builds it. Then
    ``train_parameters`` chooses what trains (`select_trainable_parameters`): with LoRA the PEFT model is
    returned, and a new head trains in full alongside the adapter.
    """
    from .trainable import classifier_head_names, select_trainable_parameters

    head = {}
    if labels is not None:
        head = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }
    model = load_model_for_finetuning(config, auto_class, **config_fields, **head)
    if config.dense_control and config.train_parameters != "lora":
        return model  # the dense control has no MoE block to choose parameters by: everything trains
    head_names = classifier_head_names(model) if labels is not None else ()
    return select_trainable_parameters(model, config, head_names=head_names)
