"""TRL's `SFTTrainer` with the loss an hf_moe model defines: task loss plus the router terms.

TRL's SFTTrainer computes the loss itself, from a fused LM head over ``model.base_model``'s last
hidden state; it adds an MoE balancing term only in Mixtral's form (top-k load pooled over layers,
no z-loss), read from the dense ``text_config``, so with an hf_moe model it adds none. `MoeSFTTrainer`
keeps everything else of SFTTrainer (datasets, chat templates, completion-only loss, packing, PEFT)
and takes the loss from the model: the task loss plus ``router_aux_loss_coef * aux_loss +
router_z_loss_coef * z_loss`` (Switch eq. 4, ST-MoE eq. 5), entering each optimizer step once.
TRL's token metrics (``entropy``, ``mean_token_accuracy``, ``num_tokens``) are logged as SFTTrainer
logs them, computed from the model's logits. With a dense model (the dense control) it is plain
SFTTrainer.
"""

from dataclasses import dataclass, field, fields

import torch
from transformers import Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import entropy_from_logits

from hf_moe.modeling.registry import routing_method_of

from .arguments import precision_flags_win

# transformers 5.23 renamed gradient_checkpointing to activation_checkpointing (the old name warns).
HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}


@dataclass
class MoeSFTConfig(SFTConfig):
    """`SFTConfig` without TRL's ``router_aux_loss_coef`` (Mixtral's loss, read from the dense config); the
    coefficient of an hf_moe model is `MoeArguments.router_aux_loss_coef`, so one flag means one thing."""

    router_aux_loss_coef: float | None = field(default=None, init=False, repr=False)
    if HAS_ACTIVATION_CHECKPOINTING:
        # TRL's default (checkpointing on) under the current name: its default for the deprecated name warns.
        gradient_checkpointing: bool | None = field(
            default=None, metadata={"help": "Deprecated alias of activation_checkpointing."}
        )
        activation_checkpointing: bool | None = field(
            default=True, metadata={"help": "Recompute activations in the backward pass to save memory."}
        )

    def __post_init__(self):
        # TRL defaults to bf16, which TrainingArguments refuses without a GPU unless told to use the CPU.
        if not self.use_cpu and not torch.accelerator.is_available():
            self.use_cpu = True
        flag_given = self.bf16 is not None  # TRL's default (None) becomes bf16 unless fp16
        super().__post_init__()
        precision_flags_win(self, flag_given)


def is_moe_model(model) -> bool:
    return routing_method_of(model) is not None


class MoeSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` whose loss is the hf_moe model's own (task loss + router terms)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not is_moe_model(self.model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "assistant_masks")}
        loss, outputs = Trainer.compute_loss(self, model, inputs, True, num_items_in_batch)
        self._log_token_metrics(outputs.logits, inputs)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _log_token_metrics(self, logits: torch.Tensor, inputs: dict) -> None:
        """SFTTrainer's metrics from the logits: the mean entropy and top-1 accuracy of the next-token
        predictions over labelled positions, and (training) the tokens seen so far."""
        mode = "train" if self.model.training else "eval"
        labels = inputs.get("shift_labels")
        if labels is None:
            labels, logits = inputs["labels"][:, 1:], logits[:, :-1]
        mask = labels != -100  # (batch, positions)
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(mask.sum()).sum()
        entropy_sum = gather((entropy_from_logits(logits.detach().float()) * mask).sum()).sum()
        num_correct = gather(((logits.argmax(-1) == labels) & mask).sum()).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                tokens = gather(inputs["attention_mask"].sum()).sum().item()
            else:  # padding-free batches: one row of position ids
                tokens = gather(torch.tensor(inputs["position_ids"].size(1), device=labels.device)).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
