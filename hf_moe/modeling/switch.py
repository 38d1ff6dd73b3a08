"""Switch routing (token choice): each token picks its top-k experts.

Its config, router, load-balancing loss, model classes and `RoutingMethod`, registered as
``"switch"``. Fedus et al. 2021, "Switch Transformers" (eq. 2-4); top-k > 1 as in GShard / Mixtral.

This file is copied next to saved checkpoints for ``trust_remote_code``: relative imports only.
"""

import math

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_moe import BALANCE_SCOPES, MoeConfig, check_capacity, check_number
from .modeling_moe import MoeGenerationMixin, MoePreTrainedModel
from .routing import Assignments, Router, RoutingMethod, RoutingRecord, router_logits_fp32


class SwitchMoeConfig(MoeConfig):
    r"""Token-choice MoE (Switch Transformer when ``num_experts_per_tok=1``; top-k otherwise).

    Args:
        text_config: the dense decoder to transform (config object or dict with ``model_type``).
        num_experts: experts per MoE layer.
        moe_layers: explicit layer indices, or ``"every_other"`` (odd layers), ``"all"``, ``"last_half"``;
            stored resolved to indices.
        moe_intermediate_size: the experts' intermediate width; ``None`` (default) = the dense MLP's. Narrower
            experts are fine-grained ones (upcycled with ``granularity``: each a shard of the dense MLP).
        num_experts_per_tok: k of top-k.
        norm_topk_prob: ``False`` scales each expert output by its gate probability (Switch eq. 2);
            ``True`` renormalises the k gates to sum 1 (Mixtral), which makes an upcycled model
            compute exactly the dense function.
        capacity_factor: training capacity factor; expert capacity per sequence is
            ``ceil(capacity_factor * seq_len * k / num_experts)`` (Switch eq. 3). ``None`` = dropless.
        eval_capacity_factor: the same for evaluation and generation; ``None`` (default) = dropless.
        router_jitter_noise: multiplicative jitter epsilon on the router input, training only.
        router_aux_loss_coef: load-balancing loss coefficient (Switch eq. 4, default 1e-2).
        balance_scope: the tokens over which the load-balancing loss counts each expert's share f_i.
            ``"micro_batch"`` (default): this process's batch. ``"global_batch"``: in training
            forwards, the counts are summed over every process of the data-parallel group (Qiu et al.
            2025, "Demons in the Detail", arXiv 2501.11873), so the loss, its value and its gradient,
            equals that of one process on the concatenated batch; without torch.distributed it equals
            ``"micro_batch"``. Micro-batches of one optimizer step (gradient accumulation) run one
            after the other and are not pooled. The default stays ``"micro_batch"`` until a measured
            comparison chooses.
        router_z_loss_coef: router z-loss coefficient (ST-MoE eq. 5, default 1e-3).
        expert_dropout: dropout on the experts' hidden activation, training only (Switch Table 4 uses 0.4).
        router_init_std: std of the router's normal initialisation (T5X/flaxformer: 0.02).
        output_router_logits: also return every MoE layer's router logits.
        shared_expert_intermediate_size: width of an always-on shared expert, the dense MLP's own module
            added for every non-padding token (DeepSeekMoE, Dai et al. 2024, arXiv 2401.06066); None or 0: none.
        shared_expert_gate: scale the shared expert per token by sigmoid of a Linear(hidden, 1) (Qwen2-MoE).
    """

    model_type = "switch_moe"

    num_experts_per_tok: int = 1
    norm_topk_prob: bool = False
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = None
    router_jitter_noise: float = 0.0
    router_aux_loss_coef: float = 1e-2
    balance_scope: str = "micro_batch"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        problems = self._moe_problems()
        k = self.num_experts_per_tok
        if not isinstance(k, int) or isinstance(self.num_experts, int) and not 1 <= k <= self.num_experts:
            problems.append(f"num_experts_per_tok must be between 1 and num_experts ({self.num_experts}), got {k!r}")
        if not isinstance(self.norm_topk_prob, bool):
            problems.append(f"norm_topk_prob must be True or False, got {self.norm_topk_prob!r}")
        problems += check_capacity("capacity_factor", self.capacity_factor, allow_none=True)
        problems += check_capacity("eval_capacity_factor", self.eval_capacity_factor, allow_none=True)
        problems += check_number("router_jitter_noise", self.router_jitter_noise, "in [0, 1)", lambda v: 0 <= v < 1)
        problems += check_number("router_aux_loss_coef", self.router_aux_loss_coef, ">= 0", lambda v: v >= 0)
        if self.balance_scope not in BALANCE_SCOPES:
            problems.append(f"balance_scope must be one of {list(BALANCE_SCOPES)}, got {self.balance_scope!r}")
        self._finish(problems)


def fill_capacity_in_token_order(expert_idx: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Keep mask for token-choice picks under a per-sequence expert capacity.

    ``expert_idx`` is (sequences, seq_len, k). Slots are filled in token order: token t places
    all its k choices before token t+1, so a token's fate never depends on later tokens
    (causal). Implemented with a stable sort by (sequence, expert): the rank of a pick inside
    its group is its arrival order, with no one-hot tokens x experts x capacity tensor.
    """
    batch = expert_idx.shape[0]
    group = (torch.arange(batch, device=expert_idx.device)[:, None, None] * num_experts + expert_idx).flatten()
    order = torch.argsort(group, stable=True)
    sorted_group = group[order]
    # First position of each group in sorted order, by binary search: no host synchronisation.
    group_start = torch.searchsorted(sorted_group, sorted_group)
    rank = torch.empty_like(group)
    rank[order] = torch.arange(group.numel(), device=group.device) - group_start
    return (rank < capacity).view(expert_idx.shape)


class TokenChoiceRouter(Router):
    """Each token picks its top-k experts (Switch for k=1; GShard / Mixtral for k>1).

    p = softmax(W_r x) in float32. ``norm_topk_prob=False`` keeps the raw gate p_i as combine
    weight (Switch eq. 2, which gives the router its gradient); ``True`` renormalises the k
    gates to sum 1 (Mixtral §2.1). Jitter multiplies the router input only, training only
    (Switch App. C). Capacity per sequence, ``ceil(capacity_factor * seq_len * k / E)``
    (Switch eq. 3), filled in token order; ``None`` is dropless.
    """

    def __init__(self, hidden_size: int, config, dtype=None, device=None):
        super().__init__(config.num_experts, hidden_size, dtype, device)
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.jitter_noise = config.router_jitter_noise

    def capacity(self, seq_len: int) -> int | None:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        return max(1, math.ceil(factor * seq_len * self.top_k / self.num_experts))

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates, experts), each (..., k), of ``logits`` (..., experts): the top-k of p = softmax(logits)
        and their gates (renormalised when ``norm_topk_prob``). Token-choice routers that pick or weigh
        differently override this and keep the capacity and dispatch of `forward`."""
        top_probs, top_experts = logits.softmax(dim=-1).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        return top_probs, top_experts

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor) -> RoutingRecord:
        batch, seq_len, _ = hidden.shape  # hidden (batch, seq, hidden); token_mask (batch, seq) bool
        router_input = hidden
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            router_input = hidden * noise
        logits = router_logits_fp32(router_input, self.weight)  # (batch, seq, experts)
        top_probs, top_experts = self.select(logits)  # (batch, seq, k) each

        keep = token_mask[..., None].expand_as(top_experts)
        capacity = self.capacity(seq_len)
        if capacity is None:
            # Dropless: every pick is a pair, padding's with weight 0 (output exactly 0, no gradient).
            # Pick p of the flat (batch * seq * k) picks is token p // k.
            picks = torch.arange(top_experts.numel(), device=hidden.device)
            kept = Assignments(
                picks.div(self.top_k, rounding_mode="floor"),
                top_experts.reshape(-1),
                torch.where(keep, top_probs, 0.0).reshape(-1),
            )
        else:
            keep = keep & fill_capacity_in_token_order(
                top_experts.masked_fill(~keep, self.num_experts), self.num_experts + 1, capacity
            )
            # How many picks fit is data-dependent, so nonzero reads the count back to the host (one
            # synchronisation). Keeping the dropped picks with weight 0 instead would spend on them
            # the expert compute that capacity exists to bound.
            kept_picks = keep.reshape(-1).nonzero().squeeze(1)  # (pairs,)
            kept = Assignments(
                kept_picks.div(self.top_k, rounding_mode="floor"),
                top_experts.reshape(-1).index_select(0, kept_picks),
                top_probs.reshape(-1).index_select(0, kept_picks),
            )
        return RoutingRecord(
            router_logits=logits.view(batch * seq_len, -1),
            assignments=kept,
            top_experts=top_experts.view(batch * seq_len, -1),
            sequence_length=seq_len,
        )


def load_balancing_loss(
    records: list[RoutingRecord], token_mask: torch.Tensor, num_experts: int, scope: str = "micro_batch"
) -> torch.Tensor:
    """Switch eq. 4-6: L_B = E * sum_i f_i * P_i over non-padding tokens, mean over MoE layers.

    f_i is the fraction of the token-choice picks (all k per token, before capacity) that went to
    expert i and P_i the mean router probability of expert i, so L_B = 1 at perfect balance for
    every k (conventions that give k at balance multiply by k).

    ``scope="global_batch"`` (Qiu et al. 2025, "Demons in the Detail", arXiv 2501.11873): the pick counts, the
    token count and (for the value only) the probability sums are summed over the processes of
    torch.distributed's default group before f_i and P_i are formed. With R processes, N tokens in
    all and S^r_i this process's sum of p_i, the global loss is L = E sum_i f_i S_i / N with
    S_i = sum_r S^r_i; its gradient with respect to this process's probabilities is E f_i / N
    (f_i carries none). Data parallelism averages gradients over the R processes, so each process
    returns the global value with the gradient of R * E sum_i f_i S^r_i / N: the average is then
    the gradient of one process on the concatenated batch, whatever each process's token count.
    Processes that hold copies of the same tokens (tensor parallelism) scale every sum alike, which
    leaves both unchanged. Without an initialised process group (or with one process) this is the
    micro-batch loss.
    """
    # Masked sums rather than boolean indexing, which would read the token count back to the host.
    picks, prob_sums = [], []
    valid = token_mask.to(records[0].router_logits.dtype)  # (tokens,)
    top_k = records[0].top_experts.shape[1]
    valid_picks = valid.repeat_interleave(top_k)  # (tokens * k,)
    for record in records:
        probs = record.router_logits.softmax(dim=-1)  # (tokens, experts)
        prob_sums.append((probs * valid[:, None]).sum(0))
        picks.append(probs.new_zeros(num_experts).index_add_(0, record.top_experts.flatten(), valid_picks))
    picks, prob_sums = torch.stack(picks), torch.stack(prob_sums)  # (layers, experts)
    num_tokens = valid.sum()
    processes = 1
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if scope == "global_batch" and distributed and torch.distributed.get_world_size() > 1:
        processes = torch.distributed.get_world_size()
        # One collective for every layer: (layers, experts) picks and probability sums, then the token count.
        totals = torch.cat([picks.flatten(), prob_sums.detach().flatten(), num_tokens[None]])
        torch.distributed.all_reduce(totals)
        picks, total_prob_sums = totals[: picks.numel()].view_as(picks), totals[picks.numel() : -1].view_as(picks)
        num_tokens = totals[-1]
    num_tokens = num_tokens.clamp(min=1)
    fractions = picks / (num_tokens * top_k)  # (layers, experts) f_i
    local = num_experts * (fractions * (prob_sums * processes / num_tokens)).sum(-1)  # (layers,)
    if processes == 1:
        return local.mean()
    value = num_experts * (fractions * (total_prob_sums / num_tokens)).sum(-1)
    return (value + (local - local.detach())).mean()


def balancing_loss(records: list[RoutingRecord], valid: torch.Tensor, config, training: bool) -> torch.Tensor:
    """`load_balancing_loss` with the config's ``balance_scope``, which pools the counts of the data-parallel
    processes in training forwards only: evaluation and generation may run on some processes and not others."""
    scope = config.balance_scope if training and torch.is_grad_enabled() else "micro_batch"
    return load_balancing_loss(records, valid, config.num_experts, scope)


class SwitchRouting(RoutingMethod):
    """Token choice; the only routing native transformers MoE architectures (Mixtral, Qwen3-MoE, ...) share."""

    name = "switch"
    config_class = SwitchMoeConfig
    balancing_loss = staticmethod(balancing_loss)

    @classmethod
    def make_router(cls, model, hidden_size, dtype, device):
        return TokenChoiceRouter(hidden_size, model.config, dtype=dtype, device=device)

    @classmethod
    def experts_per_token(cls, config) -> float:
        return config.num_experts_per_tok

    @classmethod
    def computes_dense_function(cls, config, model_class):
        # Renormalised gates over copies sum to the dense output; dropping would zero some tokens.
        return config.norm_topk_prob and config.eval_capacity_factor is None

    @classmethod
    def card_summary(cls, config, model_class):
        gates = "renormalised to sum 1" if config.norm_topk_prob else "raw softmax probability (Switch eq. 2)"
        routing = f"token choice, top-{config.num_experts_per_tok} of {config.num_experts}, gates {gates}"
        capacity = f"training capacity factor {config.capacity_factor}, evaluation " + (
            "dropless" if config.eval_capacity_factor is None else f"capacity factor {config.eval_capacity_factor}"
        )
        return routing, capacity

    @classmethod
    def card_rows(cls, config):
        return [
            ("routing", f"token choice, top-{config.num_experts_per_tok}, norm_topk_prob={config.norm_topk_prob}"),
            (
                "capacity factor (train / eval)",
                f"{config.capacity_factor} / {config.eval_capacity_factor} (None = dropless)",
            ),
            ("router_aux_loss_coef", str(config.router_aux_loss_coef)),
        ]


class SwitchMoePreTrainedModel(MoePreTrainedModel):
    config_class = SwitchMoeConfig
    routing_method = SwitchRouting


class SwitchMoeModel(SwitchMoePreTrainedModel):
    """Token-choice MoE decoder without a head (AutoModel)."""


class SwitchMoeForCausalLM(SwitchMoePreTrainedModel, MoeGenerationMixin):
    """Token-choice MoE causal LM (AutoModelForCausalLM)."""

    dense_auto_class = AutoModelForCausalLM


class SwitchMoeForSequenceClassification(SwitchMoePreTrainedModel):
    """Token-choice MoE sequence classifier (AutoModelForSequenceClassification)."""

    dense_auto_class = AutoModelForSequenceClassification


SwitchRouting.model_classes = (SwitchMoeModel, SwitchMoeForCausalLM, SwitchMoeForSequenceClassification)
