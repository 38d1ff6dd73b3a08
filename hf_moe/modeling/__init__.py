"""The two MoE architectures; importing this registers them with transformers' Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_moe import ExpertChoiceMoeConfig, SwitchMoeConfig
from .modeling_moe import (
    ExpertChoiceMoeForCausalLM,
    ExpertChoiceMoeForSequenceClassification,
    ExpertChoiceMoeModel,
    MoeBlock,
    MoeModelOutput,
    SwitchMoeForCausalLM,
    SwitchMoeForSequenceClassification,
    SwitchMoeModel,
    find_feed_forward_blocks,
)

ARCHITECTURES = {
    SwitchMoeConfig: (SwitchMoeModel, SwitchMoeForCausalLM, SwitchMoeForSequenceClassification),
    ExpertChoiceMoeConfig: (ExpertChoiceMoeModel, ExpertChoiceMoeForCausalLM, ExpertChoiceMoeForSequenceClassification),
}


def register() -> None:
    """Register both architectures with the Auto classes (idempotent), and mark them to save
    their code and ``auto_map`` with checkpoints for ``trust_remote_code`` loading."""
    for config_class, (base, causal_lm, classifier) in ARCHITECTURES.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class()
        for auto_class, model_class in (
            (AutoModel, base),
            (AutoModelForCausalLM, causal_lm),
            (AutoModelForSequenceClassification, classifier),
        ):
            auto_class.register(config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class(auto_class.__name__)


register()

__all__ = [
    "ExpertChoiceMoeConfig",
    "ExpertChoiceMoeForCausalLM",
    "ExpertChoiceMoeForSequenceClassification",
    "ExpertChoiceMoeModel",
    "MoeBlock",
    "MoeModelOutput",
    "SwitchMoeConfig",
    "SwitchMoeForCausalLM",
    "SwitchMoeForSequenceClassification",
    "SwitchMoeModel",
    "find_feed_forward_blocks",
]
