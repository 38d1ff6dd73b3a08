"""TRL's `SFTTrainer` with the loss an hf_moe model defines: task loss plus the router terms.

TRL's SFTTrainer computes the loss itself, from a fused LM head over ``model.base_model``'s last
hidden state; it adds an MoE balancing term only in Mixtral's form (top-k load pooled over layers,
no z-loss), read from the dense ``text_config``, so with an hf_moe model it adds none. `MoeSFTTrainer`
keeps everything else of SFTTrainer (datasets, chat templates, completion-only loss, packing, PEFT)
and takes the loss from the model: the task loss plus ``router_aux_loss_coef * aux_loss +
router_z_loss_coef * z_loss`` (Switch eq. 4, ST-MoE eq. 5), entering each optimizer step once.
With a dense model (the dense control) it is plain SFTTrainer.
"""

from dataclasses import dataclass, field

import torch
from transformers import Trainer
from trl import SFTConfig, SFTTrainer


@dataclass
class MoeSFTConfig(SFTConfig):
    """`SFTConfig` without TRL's ``router_aux_loss_coef`` (Mixtral's loss, read from the dense config); the
    coefficient of an hf_moe model is `MoeArguments.router_aux_loss_coef`, so one flag means one thing."""

    router_aux_loss_coef: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        # TRL defaults to bf16, which TrainingArguments refuses without a GPU unless told to use the CPU.
        if not self.use_cpu and not torch.accelerator.is_available():
            self.use_cpu = True
        super().__post_init__()


def is_moe_model(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner.config, "model_type", None) in ("switch_moe", "expert_choice_moe")


class MoeSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` whose loss is the hf_moe model's own (task loss + router terms)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not is_moe_model(self.model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "assistant_masks")}
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
