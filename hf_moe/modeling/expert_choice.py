"""Expert Choice routing (Zhou et al. 2022): each expert picks its top-C tokens of a sequence.

Its config, router (with the causal threshold mode for generation), the threshold update after each
training forward, the PEFT warning about thresholds, model classes and `RoutingMethod`, registered
as ``"expert_choice"``.

This file is copied next to saved checkpoints for ``trust_remote_code``: relative imports only.
"""

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_moe import MoeConfig, check_capacity, check_number
from .modeling_moe import MoeGenerationMixin, MoePreTrainedModel
from .routing import Assignments, Router, RoutingMethod, RoutingRecord, router_logits_fp32

INFERENCE_ROUTINGS = ("expert_choice", "threshold")


class ExpertChoiceMoeConfig(MoeConfig):
    r"""Expert-choice MoE (Zhou et al. 2022): each expert takes its top-C tokens of a sequence.

    Args:
        text_config, num_experts, moe_layers, moe_intermediate_size, router_z_loss_coef, expert_dropout,
        router_init_std, output_router_logits, shared_expert_intermediate_size, shared_expert_gate: as in
        [`SwitchMoeConfig`].
        capacity_factor: c of the paper; each expert takes ``C = round(c * seq_len / num_experts)``
            tokens of each sequence (default 2.0, Zhou et al. eq. 1).
        inference_routing: routing outside training. ``"expert_choice"``: as in training (looks at the
            whole sequence; exact for scoring whole sequences and classification, not causal).
            ``"threshold"``: a token goes to every expert whose learned score threshold it passes
            (causal and batch-invariant; for generation). ``None`` (default) picks ``"threshold"``
            for causal LM and ``"expert_choice"`` for the base model and sequence classification.
        threshold_ema_decay: decay of the running estimate of each expert's C-th largest score,
            updated in every training step.
    """

    model_type = "expert_choice_moe"

    capacity_factor: float = 2.0
    inference_routing: str | None = None
    threshold_ema_decay: float = 0.99

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        problems = self._moe_problems()
        problems += check_capacity("capacity_factor", self.capacity_factor, allow_none=False)
        if self.inference_routing is not None and self.inference_routing not in INFERENCE_ROUTINGS:
            problems.append(
                f"inference_routing must be one of {list(INFERENCE_ROUTINGS)} or None, got {self.inference_routing!r}"
            )
        problems += check_number("threshold_ema_decay", self.threshold_ema_decay, "in [0, 1)", lambda v: 0 <= v < 1)
        self._finish(problems)


class ExpertChoiceRouter(Router):
    """Each expert picks its top-C tokens of a sequence (Zhou et al. 2022, eq. 1-4).

    S = softmax(X W_g) over experts (float32); expert e takes the C tokens with the largest
    S[:, e] in each sequence, C = round(capacity_factor * seq_len / E); combine weight S[t, e].

    Expert choice is **not causal**: whether token t is picked depends on the scores of every
    token in its sequence, later ones included. Modes outside training (``inference_routing``):

    - ``"expert_choice"``: as in training. Exact for scoring whole sequences and for
      classification; a decoder trained this way can learn to read the future, and cached
      generation does not reproduce full-sequence outputs.
    - ``"threshold"``: token t goes to every expert e with S[t, e] >= threshold[e], where the
      thresholds are running estimates (EMA, updated every training step) of each expert's C-th
      largest score. Causal and batch-invariant, so cached generation equals full forwards.
      Before any training step the thresholds are 0: every token goes to every expert, and the
      output is sum_e S[t, e] E_e(x) (exactly the dense MLP when all experts are equal copies).

    The thresholds are buffers, state of a fine-tune like the weights: a PEFT adapter keeps them
    when ``"router"`` is in its ``modules_to_save`` (which also trains the router in full).
    """

    def __init__(self, hidden_size: int, config, inference_routing: str, dtype=None, device=None):
        super().__init__(config.num_experts, hidden_size, dtype, device)
        self.capacity_factor = config.capacity_factor
        self.threshold_ema_decay = config.threshold_ema_decay
        self.inference_routing = inference_routing
        self.register_buffer("score_thresholds", torch.zeros(config.num_experts, dtype=torch.float32, device=device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long, device=device))

    def reset_parameters(self, init, std: float) -> None:
        super().reset_parameters(init, std)
        init.zeros_(self.score_thresholds)
        init.zeros_(self.threshold_updates)

    def capacity(self, seq_len: int) -> int:
        return min(seq_len, max(1, round(self.capacity_factor * seq_len / self.num_experts)))

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor) -> RoutingRecord:
        batch, seq_len, _ = hidden.shape
        logits = router_logits_fp32(hidden, self.weight)  # (batch, seq, experts)
        scores = logits.softmax(dim=-1)
        if self.training or self.inference_routing == "expert_choice":
            # Padding scores -1 < any softmax value: never picked while a real token is left.
            masked = scores.masked_fill(~token_mask[..., None], -1.0).transpose(1, 2)  # (batch, experts, seq)
            top_scores, top_tokens = masked.topk(self.capacity(seq_len), dim=-1)  # (batch, experts, C)
            # Every slot is a pair (batch * experts * C of them: no host synchronisation); slots that
            # had to take a padding token (score -1) get weight 0.
            token_idx = top_tokens + torch.arange(batch, device=hidden.device).view(batch, 1, 1) * seq_len
            expert_idx = torch.arange(self.num_experts, device=hidden.device).view(1, -1, 1).expand_as(top_tokens)
            weight = torch.where(top_scores >= 0, top_scores, 0.0)
            kept = Assignments(token_idx.reshape(-1), expert_idx.reshape(-1), weight.reshape(-1))
            capacity_scores = top_scores[..., -1]  # (batch, experts); < 0 where the sequence ran out of tokens
        else:
            passed = (scores >= self.score_thresholds) & token_mask[..., None]  # (batch, seq, experts)
            # How many pairs pass is data-dependent: nonzero reads the count back to the host (one
            # synchronisation); a fixed-size list would run every token through every expert.
            token_idx, expert_idx = passed.view(batch * seq_len, -1).nonzero(as_tuple=True)
            kept = Assignments(token_idx, expert_idx, scores.view(batch * seq_len, -1)[token_idx, expert_idx])
            capacity_scores = None
        return RoutingRecord(
            router_logits=logits.view(batch * seq_len, -1), assignments=kept, capacity_scores=capacity_scores
        )

    def has_trained_state(self) -> bool:
        return not self.threshold_updates.is_meta and self.threshold_updates.item() > 0

    @torch.no_grad()
    def update_thresholds(self, capacity_scores: torch.Tensor, data_parallel: bool = False) -> None:
        """EMA of each expert's C-th largest score over the sequences that filled C slots.

        ``data_parallel``: the processes of the default process group each hold part of the batch;
        the estimate is then taken over all of their sequences (one all-reduce), so every process
        keeps the same thresholds, the ones one process would learn from the whole batch.
        """
        full = capacity_scores >= 0  # (batch, experts)
        # (2, experts): the summed C-th scores and how many sequences filled C slots
        totals = torch.stack([torch.where(full, capacity_scores, 0.0).sum(0), full.sum(0).to(capacity_scores.dtype)])
        if data_parallel:
            torch.distributed.all_reduce(totals)
        batch_estimate, count = totals[0] / totals[1].clamp(min=1), totals[1]
        # The first update takes the estimate as is; later ones average with the running value.
        rate = torch.where(self.threshold_updates == 0, 1.0, 1.0 - self.threshold_ema_decay)
        updated = self.score_thresholds + rate * (batch_estimate - self.score_thresholds)
        self.score_thresholds.copy_(torch.where(count > 0, updated, self.score_thresholds))
        self.threshold_updates += 1


class ExpertChoiceRouting(RoutingMethod):
    """Expert choice: balanced by construction (no balancing loss), not causal in training."""

    name = "expert_choice"
    config_class = ExpertChoiceMoeConfig
    no_native_counterpart = (
        "Expert Choice routing has no native counterpart: native MoE architectures route by token choice"
    )
    routers_learn_state = (
        "the Expert-Choice score thresholds (router.score_thresholds, read by the causal inference routing)"
    )

    @classmethod
    def make_router(cls, model, hidden_size, dtype, device):
        inference_routing = model.config.inference_routing or model.default_inference_routing
        return ExpertChoiceRouter(hidden_size, model.config, inference_routing, dtype=dtype, device=device)

    @classmethod
    def after_training_forward(cls, model, routers, records):
        data_parallel = model._is_data_parallel()
        for router, record in zip(routers, records, strict=True):
            router.update_thresholds(record.capacity_scores, data_parallel)

    @classmethod
    def experts_per_token(cls, config) -> float:
        # Each expert takes C = c * T / E of T tokens: c experts per token on average (at most all E).
        return min(config.capacity_factor, config.num_experts)

    @classmethod
    def computes_dense_function(cls, config, model_class):
        # Thresholds start at 0: every token goes to every expert with weights summing to 1.
        return (config.inference_routing or model_class.default_inference_routing) == "threshold"

    @classmethod
    def card_summary(cls, config, model_class):
        inference = config.inference_routing or model_class.default_inference_routing
        routing = f"expert choice over {config.num_experts} experts, inference routing {inference!r}"
        capacity = (
            f"capacity factor {config.capacity_factor} (each expert takes round(c * seq_len / E) tokens of a sequence)"
        )
        return routing, capacity

    @classmethod
    def card_rows(cls, config):
        return [("routing", f"expert choice, capacity factor {config.capacity_factor}")]


class ExpertChoiceMoePreTrainedModel(MoePreTrainedModel):
    config_class = ExpertChoiceMoeConfig
    routing_method = ExpertChoiceRouting
    # Routing outside training when the config's inference_routing is None.
    default_inference_routing = "expert_choice"


class ExpertChoiceMoeModel(ExpertChoiceMoePreTrainedModel):
    """Expert-choice MoE decoder without a head (AutoModel); see `ExpertChoiceRouter` on causality."""


class ExpertChoiceMoeForCausalLM(ExpertChoiceMoePreTrainedModel, MoeGenerationMixin):
    """Expert-choice MoE causal LM (AutoModelForCausalLM).

    Expert choice is not causal (`ExpertChoiceRouter`). Training always uses expert choice;
    outside training this head defaults to ``inference_routing="threshold"``, which is causal,
    so cached generation equals full forwards. Set ``"expert_choice"`` to score whole sequences
    exactly as in training.
    """

    dense_auto_class = AutoModelForCausalLM
    default_inference_routing = "threshold"


class ExpertChoiceMoeForSequenceClassification(ExpertChoiceMoePreTrainedModel):
    """Expert-choice MoE sequence classifier (AutoModelForSequenceClassification)."""

    dense_auto_class = AutoModelForSequenceClassification


ExpertChoiceRouting.model_classes = (
    ExpertChoiceMoeModel,
    ExpertChoiceMoeForCausalLM,
    ExpertChoiceMoeForSequenceClassification,
)
