"""What every routing method shares: the router interface, its record, the z-loss, and `RoutingMethod`.

A router only decides which (token, expert, weight) assignments exist: it returns a `RoutingRecord`
holding sparse `Assignments` (one entry per token-expert pair that is computed) and what the
model computes its auxiliary losses and statistics from. Dispatch, the experts and the combine
step are shared by all routers (see `MoeBlock`). Each routing method (``switch.py``,
``expert_choice.py``, ``aux_free.py``) is one module: its config, its router, its losses and its model classes,
described by a `RoutingMethod` and registered by name (``registry.py``).

Routing math runs in float32 under any autocast (Switch §2.4: selective precision).
Padding tokens (``token_mask`` False) never take capacity and their MoE output is exactly 0.
Where the number of pairs is fixed by the shapes (dropless token choice, expert choice in
training), a padding token's pairs stay in the lists with weight 0, so the list lengths are known
without a host synchronisation; where it depends on the data (capacity dropping, threshold
routing), the pairs are selected with ``nonzero`` and padding gets none.
"""

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
    sequence_length: int | None = None  # token choice: tokens per sequence (rows of router_logits per sequence)


def router_logits_fp32(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h = W_r x in float32, whatever autocast or parameter dtype is active."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return nn.functional.linear(hidden.float(), weight.float())


def router_z_loss(record: RoutingRecord, token_mask: torch.Tensor) -> torch.Tensor:
    """ST-MoE eq. 5: mean over non-padding tokens of (logsumexp_j h_j)^2."""
    valid = token_mask.to(record.router_logits.dtype)
    return (record.router_logits.logsumexp(dim=-1).square() * valid).sum() / valid.sum().clamp(min=1)


class Router(nn.Module):
    """A router: ``forward(hidden (batch, seq, hidden), token_mask (batch, seq) bool) -> RoutingRecord``.

    Its logits are ``weight`` (experts, hidden) times the hidden state (`router_logits_fp32`); the
    model initialises ``weight`` from ``config.router_init_std`` through `reset_parameters`.
    """

    def __init__(self, num_experts: int, hidden_size: int, dtype=None, device=None):
        super().__init__()
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device))

    def reset_parameters(self, init, std: float) -> None:
        """``init`` is transformers' `initialization` module, whose functions skip loaded tensors."""
        init.normal_(self.weight, mean=0.0, std=std)

    def has_trained_state(self) -> bool:
        """Whether training has moved state of this router besides its weights (`RoutingMethod.routers_learn_state`)."""
        return False


class RoutingMethod:
    """One routing method as the model, the converter, the trainers and the cards ask for it.

    Subclassed once per method, next to its config, router and losses, and registered under `name`
    (the ``--routing`` value) with `registry.register_routing`; never instantiated. Every question the
    package asks about a routing method is an attribute or method here, so nothing compares
    ``model_type`` strings.
    """

    name: str  # the registry key and ``hf-moe upcycle --routing`` value
    config_class: type  # its config class (a `MoeConfig`); its ``model_type`` names saved checkpoints
    # (base model, causal LM, sequence classifier): the heads, in that order (the converter's head index)
    model_classes: tuple[type, type, type]
    # Why an exported checkpoint cannot use it (native transformers MoE architectures route by token
    # choice); None when it may map onto them (`hf-moe export` then looks for a native family taking this
    # routing and backbone, ``NativeFamily.routing``, and checks the settings).
    no_native_counterpart: str | None = None
    # What training changes in the routers besides their weights (buffers), named in the warning when a PEFT
    # adapter leaves it out: the adapter must save the routers (``modules_to_save``) for a reloaded adapter to
    # route as the trained model did. None: nothing (see `Router.has_trained_state`).
    routers_learn_state: str | None = None
    # ``balancing_loss(records, valid, config, training) -> tensor``, the load-balancing loss over every
    # MoE layer, weighted by ``config.router_aux_loss_coef`` in the loss; None when the method has none.
    balancing_loss = None

    @classmethod
    def make_router(cls, model, hidden_size: int, dtype, device) -> Router:
        """The router of one MoE block of ``model`` (its config and class attributes are read)."""
        raise NotImplementedError(f"{cls.__name__} must define make_router")

    @classmethod
    def after_training_forward(cls, model, routers: list[nn.Module], records: list[RoutingRecord]) -> None:
        """Called after every training forward with each MoE block's router and record (state updates)."""

    @classmethod
    def on_model_init(cls, model) -> None:
        """Called once at the end of building ``model`` (hooks)."""

    @classmethod
    def experts_per_token(cls, config) -> float:
        """How many experts compute a token on average: the active parameter count's share of experts."""
        raise NotImplementedError(f"{cls.__name__} must define experts_per_token")

    @classmethod
    def computes_dense_function(cls, config, model_class: type) -> bool:
        """Whether a model whose experts are all copies of the dense MLP computes the dense function
        outside training (what the converter's verification then checks)."""
        return False

    @classmethod
    def card_summary(cls, config, model_class: type) -> tuple[str, str]:
        """(routing, capacity): one phrase each for an upcycled checkpoint's card."""
        raise NotImplementedError(f"{cls.__name__} must define card_summary")

    @classmethod
    def card_rows(cls, config) -> list[tuple[str, str]]:
        """(field, value) rows of the routing settings for a fine-tuned model's card."""
        raise NotImplementedError(f"{cls.__name__} must define card_rows")
