"""Routers: they only decide which (token, expert, weight) assignments exist.

Every router returns sparse `Assignments` (one entry per token-expert pair that is computed)
and a `RoutingRecord` from which the model computes its auxiliary losses and statistics.
Dispatch, the experts and the combine step are shared by all routers (see `MoeBlock`).

Routing math runs in float32 under any autocast (Switch §2.4: selective precision).
Padding tokens (``token_mask`` False) never take capacity and their MoE output is exactly 0.
Where the number of pairs is fixed by the shapes (dropless token choice, expert choice in
training), a padding token's pairs stay in the lists with weight 0, so the list lengths are known
without a host synchronisation; where it depends on the data (capacity dropping, threshold
routing), the pairs are selected with ``nonzero`` and padding gets none.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Assignments:
    """Flat lists of the token-expert pairs to compute; tokens index the (batch * seq) axis.

    Pairs of padding tokens may be present with weight 0 (see the module docstring).
    """

    token_idx: torch.Tensor  # (pairs,) long
    expert_idx: torch.Tensor  # (pairs,) long
    weight: torch.Tensor  # (pairs,) float32 combine weight


@dataclass
class RoutingRecord:
    """What one MoE layer's routing leaves for the losses and statistics."""

    router_logits: torch.Tensor  # (tokens, experts) float32
    assignments: Assignments  # the kept pairs, after capacity
    top_experts: torch.Tensor | None = None  # (tokens, k) token-choice picks before capacity
    capacity_scores: torch.Tensor | None = None  # (sequences, experts) expert choice: C-th largest score


def router_logits_fp32(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h = W_r x in float32, whatever autocast or parameter dtype is active."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return nn.functional.linear(hidden.float(), weight.float())


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


class TokenChoiceRouter(nn.Module):
    """Each token picks its top-k experts (Switch for k=1; GShard / Mixtral for k>1).

    p = softmax(W_r x) in float32. ``norm_topk_prob=False`` keeps the raw gate p_i as combine
    weight (Switch eq. 2, which gives the router its gradient); ``True`` renormalises the k
    gates to sum 1 (Mixtral §2.1). Jitter multiplies the router input only, training only
    (Switch App. C). Capacity per sequence, ``ceil(capacity_factor * seq_len * k / E)``
    (Switch eq. 3), filled in token order; ``None`` is dropless.
    """

    def __init__(self, hidden_size: int, config, dtype=None, device=None):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.jitter_noise = config.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size, dtype=dtype, device=device))

    def capacity(self, seq_len: int) -> int | None:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        return max(1, math.ceil(factor * seq_len * self.top_k / self.num_experts))

    def forward(self, hidden: torch.Tensor, token_mask: torch.Tensor) -> RoutingRecord:
        batch, seq_len, _ = hidden.shape  # hidden (batch, seq, hidden); token_mask (batch, seq) bool
        router_input = hidden
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            router_input = hidden * noise
        logits = router_logits_fp32(router_input, self.weight)  # (batch, seq, experts)
        probs = logits.softmax(dim=-1)
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)  # (batch, seq, k)
        if self.norm_topk_prob:
            top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)

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
        )


class ExpertChoiceRouter(nn.Module):
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
        super().__init__()
        self.num_experts = config.num_experts
        self.capacity_factor = config.capacity_factor
        self.threshold_ema_decay = config.threshold_ema_decay
        self.inference_routing = inference_routing
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size, dtype=dtype, device=device))
        self.register_buffer("score_thresholds", torch.zeros(config.num_experts, dtype=torch.float32, device=device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long, device=device))

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
