"""Auxiliary-loss-free balancing (token choice with per-expert selection biases).

Its config, router, bias update, optional sequence-wise balance loss, model classes and
`RoutingMethod`, registered as ``"aux_free"``. Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
Strategy for Mixture-of-Experts" (arXiv 2408.15664, §3 and Algorithm 1), as used by DeepSeek-V3
(DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", arXiv 2412.19437, §2.1.2, eq. 12-20):

- scores s = sigmoid(W_r x) (DeepSeek-V3 eq. 15; ``scoring_func="softmax"`` for softmax);
- selection takes the top-k of s_i + b_i (eq. 16), the gates use s_i alone, renormalised over the
  selected experts, g_i = s_i / sum_selected s_j (eq. 13; ``norm_topk_prob``);
- after each optimizer step, b_i <- b_i + gamma * sign(mean load - load_i) over the tokens of that
  step (Algorithm 1: once per training batch; DeepSeek-V3: "at the end of each step"), gamma = 1e-3
  (DeepSeek-V3 §4.2, and the update-rate study of Wang et al. §4.3); b is a buffer, with no gradient;
- optionally DeepSeek-V3's sequence-wise balance loss (eq. 17-20, alpha = 1e-4 in §4.2), off by default
  (``router_aux_loss_coef=0``: the method of Wang et al. uses no auxiliary loss at all).

Capacity and dropping are those of token choice (`TokenChoiceRouter`); the default is dropless
(DeepSeek-V3 §2.1.2 drops no token in training or inference).

This file is copied next to saved checkpoints for ``trust_remote_code``: relative imports only.
"""

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_moe import MoeConfig, check_capacity, check_number
from .modeling_moe import MoeGenerationMixin, MoePreTrainedModel
from .routing import RoutingMethod, RoutingRecord
from .switch import TokenChoiceRouter

SCORING_FUNCS = ("sigmoid", "softmax")
# The number of training forwards whose load waits for the next optimizer step, on the model's __dict__.
PENDING_FORWARDS = "_bias_pending_forwards"


class AuxFreeMoeConfig(MoeConfig):
    r"""Token choice with auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 §2.1.2).

    Args:
        text_config, num_experts, moe_layers, expert_dropout, router_init_std, output_router_logits:
            as in [`SwitchMoeConfig`].
        num_experts_per_tok: k of top-k (default 2: renormalised top-2 keeps an upcycled model's function
            at step 0 and gives the router a task-loss gradient).
        scoring_func: ``"sigmoid"`` (default, DeepSeek-V3 eq. 15) or ``"softmax"`` scores s_i.
        norm_topk_prob: renormalise the selected scores to sum 1 (default True, DeepSeek-V3 eq. 13);
            False keeps the raw s_i as gates.
        bias_update_rate: gamma of b_i <- b_i + gamma * sign(mean load - load_i), applied once per
            optimizer step (default 1e-3, DeepSeek-V3 §4.2; Wang et al. §4.3 study the rate).
        router_aux_loss_coef: alpha of DeepSeek-V3's sequence-wise balance loss (eq. 17-20). Default 0:
            the method of Wang et al. uses no auxiliary loss; DeepSeek-V3 sets 1e-4 (§4.2).
        capacity_factor, eval_capacity_factor, router_jitter_noise: as in [`SwitchMoeConfig`];
            the capacity factors default to None (dropless, as DeepSeek-V3).
        router_z_loss_coef: router z-loss coefficient (default 0: neither paper uses one).
    """

    model_type = "aux_free_moe"

    num_experts_per_tok: int = 2
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    bias_update_rate: float = 1e-3
    router_aux_loss_coef: float = 0.0
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    router_jitter_noise: float = 0.0
    router_z_loss_coef: float = 0.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        problems = self._moe_problems()
        k = self.num_experts_per_tok
        if not isinstance(k, int) or isinstance(self.num_experts, int) and not 1 <= k <= self.num_experts:
            problems.append(f"num_experts_per_tok must be between 1 and num_experts ({self.num_experts}), got {k!r}")
        if self.scoring_func not in SCORING_FUNCS:
            problems.append(f"scoring_func must be one of {list(SCORING_FUNCS)}, got {self.scoring_func!r}")
        if not isinstance(self.norm_topk_prob, bool):
            problems.append(f"norm_topk_prob must be True or False, got {self.norm_topk_prob!r}")
        problems += check_number("bias_update_rate", self.bias_update_rate, ">= 0", lambda v: v >= 0)
        problems += check_number("router_aux_loss_coef", self.router_aux_loss_coef, ">= 0", lambda v: v >= 0)
        problems += check_capacity("capacity_factor", self.capacity_factor, allow_none=True)
        problems += check_capacity("eval_capacity_factor", self.eval_capacity_factor, allow_none=True)
        problems += check_number("router_jitter_noise", self.router_jitter_noise, "in [0, 1)", lambda v: 0 <= v < 1)
        self._finish(problems)


def routing_scores(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """s = sigmoid(logits) or softmax(logits) over experts."""
    return logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)


class AuxFreeRouter(TokenChoiceRouter):
    """Token choice whose top-k selection adds a per-expert bias to the scores; the gates do not.

    ``expert_bias`` (float32 buffer, no gradient) is b of Wang et al.: saved with the model and used
    for selection in training and inference. Every training forward adds its picks (before capacity,
    non-padding tokens) to ``pending_load`` (not saved); the optimizer step turns them into one bias
    update (`AuxFreeRouting.update_biases`). A PEFT adapter keeps the biases when ``"router"`` is in
    its ``modules_to_save``.
    """

    def __init__(self, hidden_size: int, config, dtype=None, device=None):
        super().__init__(hidden_size, config, dtype=dtype, device=device)
        self.scoring_func = config.scoring_func
        self.bias_update_rate = config.bias_update_rate
        self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32, device=device))
        self.register_buffer("bias_updates", torch.zeros((), dtype=torch.long, device=device))
        # Not saved, so built where the backbone's unsaved buffers (rotary tables) are: on the default device,
        # also when the weights are empty (the converter builds models under init_empty_weights).
        self.register_buffer("pending_load", torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)

    def reset_parameters(self, init, std: float) -> None:
        super().reset_parameters(init, std)
        init.zeros_(self.expert_bias)
        init.zeros_(self.bias_updates)
        init.zeros_(self.pending_load)

    def _apply(self, fn, recurse=True):
        # A cast of the model (``model.to(torch.bfloat16)``, ``.half()``) moves the biases but keeps them in
        # float32: updates of 1e-3 vanish in half precision (bfloat16 resolves 4e-3 at 1).
        kept = {name: getattr(self, name) for name in ("expert_bias", "pending_load")}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != torch.float32:
                setattr(self, name, before.to(device=after.device))
        return self

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = routing_scores(logits, self.scoring_func)
        # The bias steers which experts are picked (DeepSeek-V3 eq. 16), never their weight.
        top_experts = (scores + self.expert_bias.to(scores.dtype)).topk(self.top_k, dim=-1).indices
        gates = scores.gather(-1, top_experts)
        if self.norm_topk_prob:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return gates, top_experts

    @torch.no_grad()
    def add_load(self, top_experts: torch.Tensor, valid: torch.Tensor) -> None:
        """Count the picks ``top_experts`` (tokens, k) of the ``valid`` (tokens,) tokens."""
        picks = valid.to(self.pending_load.dtype).repeat_interleave(top_experts.shape[1])
        self.pending_load.index_add_(0, top_experts.flatten(), picks)

    @torch.no_grad()
    def take_load(self) -> torch.Tensor:
        """The picks counted since the last update; the count restarts at 0."""
        load = self.pending_load.clone()
        self.pending_load.zero_()
        return load

    def has_trained_state(self) -> bool:
        return not self.bias_updates.is_meta and self.bias_updates.item() > 0

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """b_i <- b_i + gamma * sign(mean load - load_i) (Wang et al. Algorithm 1): an overloaded expert's
        bias falls, an underloaded one's rises, a balanced one's stays."""
        error = load.mean() - load
        self.expert_bias.add_(self.bias_update_rate * torch.sign(error).to(self.expert_bias.dtype))
        self.bias_updates += 1


def sequence_balance_loss(records: list[RoutingRecord], valid: torch.Tensor, config, training: bool) -> torch.Tensor:
    """DeepSeek-V3 eq. 17-20, per sequence and mean over sequences and MoE layers:
    L = sum_i f_i P_i, f_i = E / (k T) * #{t: i in top-k of s_t}, P_i = mean_t s_i,t / sum_j s_j,t.

    T counts the sequence's non-padding tokens; the top-k is of the scores without the bias (eq. 18).
    L = 1 at perfect balance, as the Switch loss. Weighted by ``router_aux_loss_coef`` (alpha)."""
    num_experts, top_k = config.num_experts, config.num_experts_per_tok
    losses = []
    for record in records:
        seq_len = record.sequence_length
        scores = routing_scores(record.router_logits, config.scoring_func)  # (tokens, experts)
        weights = valid.to(scores.dtype)[:, None]  # (tokens, 1)
        normalised = scores / scores.sum(dim=-1, keepdim=True) * weights
        picks = scores.new_zeros(scores.shape).scatter_(1, scores.topk(top_k, dim=-1).indices, 1.0) * weights
        tokens = weights.view(-1, seq_len).sum(1).clamp(min=1)[:, None]  # (sequences, 1)
        f = picks.view(-1, seq_len, num_experts).sum(1) * num_experts / (top_k * tokens)  # (sequences, experts)
        p = normalised.view(-1, seq_len, num_experts).sum(1) / tokens
        has_tokens = (weights.view(-1, seq_len).sum(1) > 0).to(scores.dtype)
        losses.append(((f * p).sum(-1) * has_tokens).sum() / has_tokens.sum().clamp(min=1))
    return torch.stack(losses).mean()


def _register_bias_updates(model) -> None:
    """Update ``model``'s biases after each optimizer step (torch's global optimizer step hook), so gradient
    accumulation gives one update per step over all of its micro-batches. The hook holds the model weakly
    and is removed with it."""
    model_ref = weakref.ref(model)

    def after_optimizer_step(optimizer, args, kwargs) -> None:
        trained = model_ref()
        if trained is not None:
            AuxFreeRouting.update_biases(trained)

    handle = register_optimizer_step_post_hook(after_optimizer_step)
    weakref.finalize(model, handle.remove)


class AuxFreeRouting(RoutingMethod):
    """Token choice balanced by selection biases instead of (or beside) an auxiliary loss.

    Native counterparts: transformers' DeepSeek-V3-style MoE blocks select by sigmoid score plus
    ``e_score_correction_bias`` and weigh by the score alone, which is this block with ``scoring_func="sigmoid"``
    and dropless evaluation (either ``norm_topk_prob``). ``hf-moe export`` writes it as dots1 (qwen3's attention)
    or glm4_moe (llama's attention: ``use_qk_norm=False``, ``partial_rotary_factor=1``), whose MoE layers run from
    ``first_k_dense_replace`` to the last, with the biases as ``e_score_correction_bias``; ``hf-moe import``
    reads them back (docs/moe-reference.md, "Auxiliary-loss-free balancing"). deepseek_v3 uses multi-head
    latent attention, which no supported backbone has.
    """

    name = "aux_free"
    config_class = AuxFreeMoeConfig
    balancing_loss = staticmethod(sequence_balance_loss)
    routers_learn_state = "the expert selection biases (router.expert_bias)"

    @classmethod
    def make_router(cls, model, hidden_size, dtype, device):
        return AuxFreeRouter(hidden_size, model.config, dtype=dtype, device=device)

    @classmethod
    def after_training_forward(cls, model, routers, records):
        for router, record in zip(routers, records, strict=True):
            valid = record.router_logits.new_ones(record.top_experts.shape[0], dtype=torch.bool)
            block_mask = model.moe_blocks()[0].token_mask
            if block_mask is not None and block_mask.numel() >= valid.numel():
                valid = block_mask[:, -record.sequence_length :].reshape(-1)
            router.add_load(record.top_experts, valid)
        model.__dict__[PENDING_FORWARDS] = model.__dict__.get(PENDING_FORWARDS, 0) + 1

    @classmethod
    @torch.no_grad()
    def update_biases(cls, model) -> None:
        """One bias update per MoE layer from the load counted since the last one (a no-op without a training
        forward since). Under data parallelism the counts of every process are summed first (one all-reduce),
        so every process applies the same update from the global load and keeps identical biases."""
        if not model.__dict__.get(PENDING_FORWARDS):
            return
        model.__dict__[PENDING_FORWARDS] = 0
        routers = [block.router for block in model.moe_blocks()]
        loads = torch.stack([router.take_load() for router in routers])  # (layers, experts)
        if model._is_data_parallel():
            torch.distributed.all_reduce(loads)
        for router, load in zip(routers, loads, strict=True):
            router.update_bias(load)

    @classmethod
    def on_model_init(cls, model):
        _register_bias_updates(model)

    @classmethod
    def experts_per_token(cls, config) -> float:
        return config.num_experts_per_tok

    @classmethod
    def computes_dense_function(cls, config, model_class):
        # Biases start at 0 and only pick among copies; renormalised gates sum to 1; dropless keeps every token.
        return config.norm_topk_prob and config.eval_capacity_factor is None

    @classmethod
    def card_summary(cls, config, model_class):
        gates = "renormalised to sum 1" if config.norm_topk_prob else "raw scores"
        routing = (
            "token choice with auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3), "
            f"top-{config.num_experts_per_tok} of {config.num_experts} by {config.scoring_func} score plus a "
            f"per-expert bias (moved by {config.bias_update_rate} x the sign of the load error after each optimizer "
            f"step), gates {gates} without the bias"
        )
        train, evaluation = (
            "dropless" if factor is None else f"capacity factor {factor}"
            for factor in (config.capacity_factor, config.eval_capacity_factor)
        )
        return routing, f"training {train}, evaluation {evaluation}"

    @classmethod
    def card_rows(cls, config):
        return [
            (
                "routing",
                f"auxiliary-loss-free token choice, top-{config.num_experts_per_tok}, "
                f"scoring_func={config.scoring_func}, norm_topk_prob={config.norm_topk_prob}",
            ),
            ("bias_update_rate", str(config.bias_update_rate)),
            ("router_aux_loss_coef (sequence-wise)", str(config.router_aux_loss_coef)),
            (
                "capacity factor (train / eval)",
                f"{config.capacity_factor} / {config.eval_capacity_factor} (None = dropless)",
            ),
        ]


class AuxFreeMoePreTrainedModel(MoePreTrainedModel):
    config_class = AuxFreeMoeConfig
    routing_method = AuxFreeRouting
    # The biases move by 1e-3 steps: kept in float32 when a checkpoint loads in half precision.
    _keep_in_fp32_modules_strict = ["expert_bias"]


class AuxFreeMoeModel(AuxFreeMoePreTrainedModel):
    """Auxiliary-loss-free token-choice MoE decoder without a head (AutoModel)."""


class AuxFreeMoeForCausalLM(AuxFreeMoePreTrainedModel, MoeGenerationMixin):
    """Auxiliary-loss-free token-choice MoE causal LM (AutoModelForCausalLM)."""

    dense_auto_class = AutoModelForCausalLM


class AuxFreeMoeForSequenceClassification(AuxFreeMoePreTrainedModel):
    """Auxiliary-loss-free token-choice MoE sequence classifier (AutoModelForSequenceClassification)."""

    dense_auto_class = AutoModelForSequenceClassification


AuxFreeRouting.model_classes = (AuxFreeMoeModel, AuxFreeMoeForCausalLM, AuxFreeMoeForSequenceClassification)
