"""The hf_moe architectures, one module per routing method; importing this registers them by routing
name (`registry`) and with transformers' Auto classes."""

from .aux_free import (
    AuxFreeMoeConfig,
    AuxFreeMoeForCausalLM,
    AuxFreeMoeForSequenceClassification,
    AuxFreeMoeModel,
    AuxFreeRouting,
)
from .configuration_moe import MoeConfig
from .expert_choice import (
    ExpertChoiceMoeConfig,
    ExpertChoiceMoeForCausalLM,
    ExpertChoiceMoeForSequenceClassification,
    ExpertChoiceMoeModel,
    ExpertChoiceRouting,
)
from .modeling_moe import MoeBlock, MoeGenerationMixin, MoeModelOutput, MoePreTrainedModel, find_feed_forward_blocks
from .registry import register_routing, routing_method, routing_method_of, routing_names
from .routing import Assignments, Router, RoutingMethod, RoutingRecord, router_logits_fp32
from .switch import (
    SwitchMoeConfig,
    SwitchMoeForCausalLM,
    SwitchMoeForSequenceClassification,
    SwitchMoeModel,
    SwitchRouting,
)

register_routing(SwitchRouting)
register_routing(ExpertChoiceRouting)
register_routing(AuxFreeRouting)

__all__ = [
    "AuxFreeMoeConfig",
    "AuxFreeMoeForCausalLM",
    "AuxFreeMoeForSequenceClassification",
    "AuxFreeMoeModel",
    "AuxFreeRouting",
    "Assignments",
    "ExpertChoiceMoeConfig",
    "ExpertChoiceMoeForCausalLM",
    "ExpertChoiceMoeForSequenceClassification",
    "ExpertChoiceMoeModel",
    "ExpertChoiceRouting",
    "MoeBlock",
    "MoeConfig",
    "MoeGenerationMixin",
    "MoeModelOutput",
    "MoePreTrainedModel",
    "Router",
    "RoutingMethod",
    "RoutingRecord",
    "SwitchMoeConfig",
    "SwitchMoeForCausalLM",
    "SwitchMoeForSequenceClassification",
    "SwitchMoeModel",
    "SwitchRouting",
    "find_feed_forward_blocks",
    "register_routing",
    "router_logits_fp32",
    "routing_method",
    "routing_method_of",
    "routing_names",
]
