"""What a recipe trains: everything, only the non-MoE parameters (ST-MoE's recommendation for
fine-tuning), only the routers, or LoRA adapters through PEFT."""

from torch import nn

from hf_moe.modeling import MoeBlock
from hf_moe.modeling.registry import routing_method_of

CLASSIFIER_HEAD_NAMES = ("score", "classifier")


def moe_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of every router and expert parameter (the parameters inside MoE blocks)."""
    names = set()
    for block_name, module in model.named_modules():
        if isinstance(module, MoeBlock):
            names.update(f"{block_name}.{name}" for name, _ in module.named_parameters())
    return names


def router_parameter_names(model: nn.Module) -> set[str]:
    names = set()
    for block_name, module in model.named_modules():
        if isinstance(module, MoeBlock):
            names.update(f"{block_name}.router.{name}" for name, _ in module.router.named_parameters())
    return names


def select_trainable_parameters(model: nn.Module, config, head_names: tuple[str, ...] = ()):
    """Set ``requires_grad`` by ``config.train_parameters``; for "lora" return the PEFT model.

    ``head_names``: modules trained in full alongside LoRA (a new classification head).
    Raises ValueError when a LoRA target matches nothing.
    """
    choice = config.train_parameters
    if choice == "lora":
        return _add_lora(model, config, head_names)
    moe_names = moe_parameter_names(model)
    if not moe_names:
        raise ValueError(f"train_parameters {choice!r}: the model has no MoE block")
    keep = {
        "all": lambda name: True,
        "non_moe": lambda name: name not in moe_names,
        "routers": lambda name: name in router_parameter_names(model),
    }[choice]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(keep(name))
    return model


def _add_lora(model: nn.Module, config, head_names: tuple[str, ...]):
    from peft import LoraConfig, get_peft_model

    module_names = [name for name, _ in model.named_modules()]
    parameter_names = [name for name, _ in model.named_parameters()]
    targets = {"target_modules": config.lora_target_modules, "target_parameters": config.lora_target_parameters}
    unmatched_modules = [
        t for t in targets["target_modules"] if not any(n == t or n.endswith("." + t) for n in module_names)
    ]
    unmatched_parameters = [
        t for t in targets["target_parameters"] if not any(n == t or n.endswith("." + t) for n in parameter_names)
    ]
    if unmatched_modules or unmatched_parameters:
        module_suffixes = sorted({n.rpartition(".")[2] for n in module_names if n})[:20]
        raise ValueError(
            f"LoRA targets match nothing in the model: lora_target_modules {unmatched_modules}, "
            f"lora_target_parameters {unmatched_parameters}. Module names end like {module_suffixes}; "
            f"parameters like {[n for n in parameter_names if 'experts' in n][:4]}"
        )
    saved = [n for n in head_names if any(m.endswith("." + n) for m in module_names)]
    method = routing_method_of(model)
    if method is not None and method.routers_learn_state:
        # Training updates router buffers (Expert-Choice score thresholds) in every step: the routers go
        # into the adapter (PEFT's modules_to_save), so loading it reproduces the model.
        saved.append("router")
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(targets["target_modules"]) or None,
        target_parameters=list(targets["target_parameters"]) or None,
        modules_to_save=saved or None,
    )
    return get_peft_model(model, lora_config)


def classifier_head_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the classification head modules a fine-tune must train alongside LoRA."""
    leaf_names = {name.rpartition(".")[2] for name, _ in model.named_modules()}
    return tuple(n for n in CLASSIFIER_HEAD_NAMES if n in leaf_names)
