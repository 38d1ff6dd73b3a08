"""What every hf_moe model shares: a dense transformers decoder with sparse MoE blocks.

The model classes of each routing method (``switch.py``, ``expert_choice.py``) subclass
`MoePreTrainedModel`, which builds the dense model of its head from ``config.text_config`` with the
matching Auto class (attention, RoPE, norms, caches and generation stay the backbone's own code),
then replaces the feed-forward block of every layer in ``config.moe_layers`` by a `MoeBlock`:

    hidden (B, S, H) -> router (float32) -> sparse assignments (token, expert, weight)
                     -> sort by expert -> experts = the dense MLP with grouped matmuls
                     -> weight and scatter-add back to (B, S, H)

This folder is copied next to saved checkpoints for ``trust_remote_code``: relative imports only,
and no ``isinstance`` against our own config classes (they are loaded twice).
"""

import contextlib
import dataclasses
import functools
import re
import warnings
from dataclasses import dataclass

import torch
import transformers.initialization as init
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .experts import GroupedExperts, GroupedLinear, make_experts, make_shared_expert
from .routing import Router, RoutingMethod, RoutingRecord, router_z_loss

LAYER_LIST_NAMES = ("layers", "h", "blocks")
# Where a dense head keeps its decoder (its base_model_prefix): "model" for llama, mistral, qwen2/3,
# gemma3, phi3 and olmo2, "transformer" for gpt2. A head's checkpoint holds backbone.<prefix>.layers...
HEAD_DECODER_PREFIXES = ("model", "transformer")
FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn")
LAYER_NUMBER = re.compile(r"\.\d+(\.|$)")  # ".3." in "model.layers.3.mlp"


def find_feed_forward_blocks(model: nn.Module, text_config) -> dict[int, str]:
    """Qualified names of each decoder layer's feed-forward block, by layer index.

    Looks for a ModuleList named one of LAYER_LIST_NAMES with num_hidden_layers entries, and in
    each layer a child named one of FEED_FORWARD_NAMES.
    """
    num_layers = text_config.num_hidden_layers
    for list_name, module in model.named_modules():
        if (
            list_name.rpartition(".")[2] in LAYER_LIST_NAMES
            and isinstance(module, nn.ModuleList)
            and len(module) == num_layers
        ):
            blocks = {}
            for index, layer in enumerate(module):
                name = next((n for n in FEED_FORWARD_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)
                if name is None:
                    break
                blocks[index] = f"{list_name}.{index}.{name}"
            else:
                return blocks
    raise ValueError(
        f"Cannot find the feed-forward blocks of model_type {text_config.model_type!r}: looked for a ModuleList "
        f"named one of {list(LAYER_LIST_NAMES)} with {num_layers} layers, each with a child named one of "
        f"{list(FEED_FORWARD_NAMES)}"
    )


class MoeBlock(nn.Module):
    """Router, then the experts on the kept (token, expert) pairs, then a sum per token.

    Tokens without a kept assignment (over capacity, or not picked by any expert) get MoE output
    exactly 0 and continue through the residual connection (Switch §2.2).

    With a ``shared_expert`` (DeepSeekMoE, Dai et al. 2024, arXiv 2401.06066, §3.2; Qwen2-MoE), an
    always-on MLP adds its output for every non-padding token, scaled per token by
    ``sigmoid(shared_expert_gate(x))`` when there is a gate (Qwen2-MoE); the routing, its losses and
    statistics concern the routed experts only. Padding tokens get 0 from it too.
    """

    def __init__(
        self,
        router: nn.Module,
        experts: GroupedExperts,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Linear | None = None,
    ):
        super().__init__()
        self.router = router
        self.experts = experts
        # Named as in Qwen2-MoE's block, so the tensors keep their names in a native export.
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        # An input, set by the model before each forward: (batch, seq) bool, False on padding. The
        # backbone calls its feed-forward block with the hidden states only, so the mask cannot come
        # as an argument; kept (not cleared) so activation-checkpoint recomputation routes exactly as
        # the forward did. The routing itself leaves through the router's output (`record_routing`).
        self.token_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, shape[-2], shape[-1]) if hidden_states.dim() != 2 else hidden_states[None]
        batch, seq_len, hidden_size = hidden.shape
        token_mask = self._token_mask(batch, seq_len, hidden.device)
        record = self.router(hidden, token_mask)
        assigned = record.assignments

        # The experts take one row per kept pair, as a top-1 choice: any number of pairs per token
        # (capacity dropping, expert choice) travels the same way, also to the experts of other
        # ranks under expert parallelism, where transformers' `ep_dispatch_experts` moves the rows.
        flat = hidden.reshape(batch * seq_len, hidden_size)
        pair_out = self.experts(
            flat.index_select(0, assigned.token_idx), assigned.expert_idx[:, None], assigned.weight[:, None]
        )  # (pairs, hidden), weighted
        # Combine: add each pair back to its token; unassigned tokens stay 0.
        out = pair_out.new_zeros(batch * seq_len, hidden_size).index_add_(0, assigned.token_idx, pair_out)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)  # (tokens, hidden)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared  # Qwen2-MoE's gate, (tokens, 1)
            out = out + shared.masked_fill(~token_mask.reshape(-1, 1), 0.0)
        return out.view(shape)

    def _token_mask(self, batch: int, seq_len: int, device) -> torch.Tensor:
        mask = self.token_mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] < seq_len:
            return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        return mask[:, -seq_len:]  # with a KV cache the mask also covers past tokens


@dataclass
class MoeModelOutput(ModelOutput):
    """Routing fields that every hf_moe output adds to its backbone's output.

    A forward returns `moe_output_class` of the backbone's output class: the backbone's own fields
    (logits, the cache under the name the installed transformers declares, hidden states, ...)
    followed by these.

    Args:
        aux_loss: load-balancing loss (Switch eq. 4), mean over MoE layers; None for expert choice.
        z_loss: router z-loss (ST-MoE eq. 5), mean over MoE layers.
        expert_load: (moe_layers, experts) fraction of the computed token-expert pairs each expert got.
        dropped_fraction: (moe_layers,) fraction of (non-padding) tokens no expert processed.
        router_logits: per MoE layer (tokens, experts) float32, when ``output_router_logits``.
    """

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None
    dropped_fraction: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@functools.cache
def moe_output_class(backbone_output_class: type) -> type:
    """The backbone's output class extended with the `MoeModelOutput` fields.

    Subclassing what the backbone returns (not declaring its fields again) keeps every field the
    installed transformers release declares, whatever it names them: the cache field was renamed
    from ``past_key_values`` to ``cache`` in transformers 5.24, and generation carries the cache
    forward by that name. ``loss`` is the backbone's task loss plus the router terms. Cached, so
    each class is created (and registered as a pytree node by transformers) once.
    """
    name = "Moe" + backbone_output_class.__name__
    return dataclasses.make_dataclass(
        name, [], bases=(MoeModelOutput, backbone_output_class), namespace={"__module__": __name__}
    )


@contextlib.contextmanager
def record_routing(routers: list[nn.Module]):
    """The `RoutingRecord` each of ``routers`` returns inside the ``with`` statement (None if not called).

    transformers records router logits the same way, with forward hooks on the router modules that
    record during one forward only (`OutputRecorder` in ``_can_record_outputs``). Its hooks are
    installed once and read a context variable that every ``capture_outputs`` forward sets to its own
    collector; the dense backbone's forward is one of them (LlamaModel's, for example), so inside it our
    hooks would see the backbone's collector, and its hook installation stops at the backbone, a
    `PreTrainedModel` with its own ``_can_record_outputs``. Here the hooks are added for one forward
    and removed after it instead: neither the blocks nor the routers hold any routing state, and an
    activation-checkpoint recomputation in the backward pass, after the ``with`` statement, records
    nothing.
    """
    records: list[RoutingRecord | None] = [None] * len(routers)

    def keep(index: int, module: nn.Module, args: tuple, record: RoutingRecord) -> None:
        records[index] = record

    handles = [router.register_forward_hook(functools.partial(keep, i)) for i, router in enumerate(routers)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


class MoePreTrainedModel(PreTrainedModel):
    """Shared wiring: build the dense model, swap in MoE blocks, collect losses and statistics."""

    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Which Auto class builds the dense model of this head.
    dense_auto_class = AutoModel
    # The routing method of the architecture: its router, losses and hooks (set by each architecture).
    routing_method: type[RoutingMethod] = RoutingMethod
    # A headless model loaded from a head's checkpoint ignores the head's weights.
    _keys_to_ignore_on_load_unexpected = [r"^backbone\.(?:lm_head|score)\."]

    def __init__(self, config):
        super().__init__(config)
        self.backbone = self.dense_auto_class.from_config(config.text_config)
        blocks = find_feed_forward_blocks(self.backbone, config.text_config)
        hidden_size = config.text_config.hidden_size
        expert_parallel_size = self._expert_parallel_size(config)
        for index in config.moe_layers:
            parent_name, _, child = blocks[index].rpartition(".")
            parent = self.backbone.get_submodule(parent_name)
            dense_mlp = getattr(parent, child)
            weight = next(dense_mlp.parameters())
            shared_expert, shared_expert_gate = None, None
            if config.shared_expert_intermediate_size:
                shared_expert = make_shared_expert(
                    dense_mlp, config.shared_expert_intermediate_size, hidden_size, config.text_config.model_type
                )
                if config.shared_expert_gate:
                    shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, dtype=weight.dtype, device=weight.device)
            experts = make_experts(
                dense_mlp,
                config.num_experts,
                hidden_size,
                config.expert_dropout,
                config.text_config.model_type,
                expert_parallel_size,
                config.moe_intermediate_size,
            )
            router = self.routing_method.make_router(self, hidden_size, weight.dtype, weight.device)
            setattr(parent, child, MoeBlock(router, experts, shared_expert, shared_expert_gate))
        self.routing_method.on_model_init(self)
        if self.routing_method.routers_learn_state:
            self.register_state_dict_post_hook(_warn_if_adapter_drops_router_state)
        # auto_map lists every Auto class a saved checkpoint serves: saving adds the head's own
        # class; AutoModel loads the decoder without its head from any head's checkpoint.
        headless = self.routing_method.model_classes[0]
        config.auto_map = {
            **(getattr(config, "auto_map", None) or {}),
            "AutoModel": f"{headless.__module__.rpartition('.')[2]}.{headless.__name__}",
        }
        self.post_init()

    @staticmethod
    def _expert_parallel_size(config) -> int:
        """The ``ep_size`` of the ``DistributedConfig`` transformers loads the model with (1 without one)."""
        distributed_config = getattr(config, "distributed_config", None)
        ep_size = getattr(distributed_config, "ep_size", None) or 1
        if config.num_experts % ep_size:
            raise ValueError(
                f"DistributedConfig ep_size must divide num_experts ({config.num_experts}) so that every rank "
                f"holds the same number of experts, got ep_size={ep_size}"
            )
        return ep_size

    def init_parallel_plans(self) -> None:
        """transformers' parallel plans: the dense backbone's own (attention, dense MLPs, embeddings,
        FSDP units), plus expert parallelism for every MoE block.

        Used when loading with ``distributed_config=DistributedConfig(ep_size=N, ...)``. The experts
        module of each block gets its rows through transformers' ``ep_dispatch_experts`` rule (its
        all-to-all or all-reduce ``EPImplementation``), and every expert weight and bias is split
        on its expert dim (``grouped_gemm``). The rules are written from the model's own module
        names (they depend on the backbone and on ``moe_layers``), with layer numbers as ``*``.
        """
        super().init_parallel_plans()
        ep_plan = {}
        for block_name, block in self.named_modules():
            if isinstance(block, MoeBlock):
                experts = LAYER_NUMBER.sub(r".*\1", f"{block_name}.experts")  # transformers' plan keys
                ep_plan[experts] = "ep_dispatch_experts"
                for name, _ in block.experts.named_parameters():
                    ep_plan[f"{experts}.{name}"] = "grouped_gemm"
        self._ep_plan = {**ep_plan, **(self._ep_plan or {})}

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """transformers' loading, plus one check: the checkpoint's MoE weights must be the ones its
        config describes. transformers only warns about missing or unexpected weights and
        initialises the missing ones randomly; for MoE layers that would silently replace trained
        experts with random ones, so it is an error here."""
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        if cls.dense_auto_class is AutoModel and "key_mapping" not in kwargs:
            # A head's checkpoint keeps the decoder one level deeper (backbone.model.layers.0...);
            # read it into this headless model, as AutoModel does with native checkpoints.
            kwargs["key_mapping"] = {rf"^backbone\.(?:{'|'.join(HEAD_DECODER_PREFIXES)})\.": "backbone."}
        # Size mismatches are collected (not raised) so that those of expert weights can be named.
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        _check_moe_weights(model, info)
        others = sorted(key for key, *_ in info["mismatched_keys"])
        if others and not ignore_mismatched_sizes:
            raise RuntimeError(
                f"Weights of the checkpoint do not fit the model's shapes: {others[:5]} (pass "
                "ignore_mismatched_sizes=True to initialise them randomly instead)"
            )
        return (model, info) if output_loading_info else model

    # Embeddings belong to the backbone (resizing, tying and PEFT go through these).
    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.backbone.set_output_embeddings(value)

    @property
    def base_model(self) -> "MoeDecoder":
        """The decoder without its head, as ``LlamaForCausalLM.base_model`` is the ``LlamaModel``
        (TRL's fused LM head reads ``last_hidden_state`` from it); see `MoeDecoder`."""
        return MoeDecoder(self)

    def moe_blocks(self) -> list[MoeBlock]:
        return [m for m in self.modules() if isinstance(m, MoeBlock)]

    @torch.no_grad()
    def initialize_weights(self):
        # transformers initialises the dense modules; it does not know the stacked expert weights
        # and routers. The `init` functions skip tensors that were loaded from a checkpoint.
        super().initialize_weights()
        with init.guard_torch_init_functions():
            for module in self.modules():
                if isinstance(module, GroupedLinear):
                    module.reset_parameters(init)
                elif isinstance(module, Router):
                    module.reset_parameters(init, self.config.router_init_std)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        labels=None,
        output_router_logits=None,
        output_routing_stats=None,
        return_dict=None,
        logits_to_keep=0,
        hidden_states_only=False,
        **kwargs,
    ) -> ModelOutput | tuple:
        r"""Run the backbone (all its arguments pass through) and collect the routing of every MoE layer.

        output_router_logits: also return every MoE layer's router logits (default: the config's).
        output_routing_stats: compute ``aux_loss``, ``z_loss``, ``expert_load`` and ``dropped_fraction``
            (default True; always in training or with labels). Generation passes False: nothing
            reads them there, and they cost a few small operations per layer per token.
        logits_to_keep: passed to a causal-LM backbone (transformers' convention): ``n`` computes the
            logits of the last ``n`` positions only (generation's prefill asks for 1), 0 all of them.
        hidden_states_only: run the dense decoder without its head and return ``last_hidden_state``
            (what `base_model` calls); the routing is handled as in a full forward.

        With ``num_items_in_batch`` (what `Trainer` passes under gradient accumulation: the label
        count of every micro-batch of the step, so that the summed micro-batch task losses are one
        mean), the router terms are weighted by this batch's share of those labels, so they too
        enter each optimizer step once (a token-weighted mean when every token has a label).
        """
        token_mask = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        blocks = self.moe_blocks()
        for block in blocks:
            block.token_mask = token_mask
        if labels is not None:
            kwargs["labels"] = labels
        module = self.backbone.base_model if hidden_states_only else self.backbone
        if not hidden_states_only and (isinstance(logits_to_keep, torch.Tensor) or logits_to_keep):
            kwargs["logits_to_keep"] = logits_to_keep  # only heads with logits take it
        routers = [block.router for block in blocks]
        with record_routing(routers) as records:
            outputs = module(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        if self.training:
            self.routing_method.after_training_forward(self, routers, records)

        extras = {}
        if output_routing_stats is not False or labels is not None or self.training:
            extras = self._routing_outputs(records, token_mask)
        if output_router_logits if output_router_logits is not None else self.config.output_router_logits:
            extras["router_logits"] = tuple(r.router_logits for r in records)
        loss = outputs.get("loss")
        if loss is not None:
            loss = self._zero_without_targets(loss, labels, kwargs)
            router_terms = self.config.router_z_loss_coef * extras["z_loss"]
            if extras["aux_loss"] is not None:
                router_terms = router_terms + self.config.router_aux_loss_coef * extras["aux_loss"]
            if kwargs.get("num_items_in_batch") is not None:
                router_terms = router_terms * self._label_count(labels, kwargs) / kwargs["num_items_in_batch"]
            loss = loss + router_terms
        output = moe_output_class(type(outputs))(**{**outputs, **extras})
        if loss is not None:
            output.loss = loss
        return output.to_tuple() if return_dict is False else output

    def _is_data_parallel(self) -> bool:
        """Whether several processes train this model together, each on its part of the batch (any
        torch.distributed launch: transformers' DistributedConfig, accelerate, DDP), so that state
        learned from the batch, such as Expert-Choice thresholds, is reduced over all of them. Every
        process then runs each training forward, as data parallelism does. Not with pipeline
        stages, whose processes hold different layers."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return False
        pipeline_stages = getattr(getattr(self.config, "distributed_config", None), "pp_size", None) or 1
        return pipeline_stages == 1 and torch.distributed.get_world_size() > 1

    def _zero_without_targets(self, loss: torch.Tensor, labels: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """A batch without any target token (all padding, labels all -100) has a task loss of 0 rather
        than the NaN of a mean over nothing; its gradient is 0 either way. No host synchronisation."""
        targets = self._targets(labels, kwargs)
        if targets is None or targets.is_floating_point():  # no labels, or a regression head
            return loss
        return torch.where((targets != -100).any(), loss, loss.new_zeros(()))

    def _label_count(self, labels: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """How many labels the task loss averages over."""
        return (self._targets(labels, kwargs) != -100).sum()

    def _targets(self, labels: torch.Tensor | None, kwargs: dict) -> torch.Tensor | None:
        """The labels the task loss averages over: a causal LM predicts labels[:, 1:] (the first label
        is never a target), unless the caller shifted them itself (``shift_labels``)."""
        targets = kwargs.get("shift_labels")
        if targets is None and labels is not None:
            targets = labels[..., 1:] if self.dense_auto_class is AutoModelForCausalLM else labels
        return targets

    def _routing_outputs(self, records: list[RoutingRecord], token_mask: torch.Tensor | None) -> dict:
        """Router losses (means over MoE layers) and per-layer statistics over non-padding tokens."""
        tokens = records[0].router_logits.shape[0]
        valid = torch.ones(tokens, dtype=torch.bool, device=records[0].router_logits.device)
        if token_mask is not None and token_mask.numel() >= tokens:
            valid = token_mask[:, -(tokens // token_mask.shape[0]) :].reshape(-1)  # with a cache: the new tokens
        num_experts = self.config.num_experts
        balancing_loss = self.routing_method.balancing_loss
        aux_loss = balancing_loss(records, valid, self.config, self.training) if balancing_loss else None
        expert_load, dropped = [], []
        num_valid = valid.sum().clamp(min=1)
        for r in records:
            # Pairs of padding tokens (present with weight 0 in dropless routing) count for nothing.
            pair_valid = valid.index_select(0, r.assignments.token_idx).float()
            counts = pair_valid.new_zeros(num_experts).index_add_(0, r.assignments.expert_idx, pair_valid)
            expert_load.append(counts / counts.sum().clamp(min=1))
            processed = torch.zeros(tokens, dtype=torch.bool, device=valid.device)
            processed[r.assignments.token_idx] = True
            dropped.append((valid & ~processed).sum() / num_valid)
        return {
            "aux_loss": aux_loss,
            "z_loss": torch.stack([router_z_loss(r, valid) for r in records]).mean(),
            "expert_load": torch.stack(expert_load),
            "dropped_fraction": torch.stack(dropped),
        }


# layer index of an expert, router or shared-expert tensor
MOE_WEIGHT = re.compile(r"\.(\d+)\.[^.]+\.(?:experts|router|shared_expert|shared_expert_gate)\.")


def _check_moe_weights(model: MoePreTrainedModel, info: dict) -> None:
    """Raise when the loaded weights have MoE blocks in other layers, other expert counts, or another
    shared expert than the config (``moe_layers``, ``num_experts``, ``shared_expert_intermediate_size``)."""
    config = model.config
    missing = {k for k in info["missing_keys"] if MOE_WEIGHT.search(k)}
    unexpected = {k for k in info["unexpected_keys"] if MOE_WEIGHT.search(k)}
    # (name, checkpoint shape, model shape); dim 0 of expert and router weights is the expert count
    mismatched = sorted(
        (k, tuple(ckpt), tuple(own)) for k, ckpt, own in info["mismatched_keys"] if MOE_WEIGHT.search(k)
    )
    if not (missing or unexpected or mismatched):
        return
    problems = []
    shared_missing = sorted(k for k in missing if ".shared_expert" in k)
    shared_unexpected = sorted(k for k in unexpected if ".shared_expert" in k)
    if shared_missing or shared_unexpected:
        problems.append(
            f"config shared_expert_intermediate_size={config.shared_expert_intermediate_size}, "
            f"shared_expert_gate={config.shared_expert_gate}, but the weights "
            + (f"lack {shared_missing[0]}" if shared_missing else f"also have {shared_unexpected[0]}")
        )
    missing, unexpected = missing - set(shared_missing), unexpected - set(shared_unexpected)
    if missing or unexpected:
        layers_missing = {int(MOE_WEIGHT.search(k)[1]) for k in missing}
        layers_unexpected = {int(MOE_WEIGHT.search(k)[1]) for k in unexpected}
        weight_layers = sorted((set(config.moe_layers) - layers_missing) | layers_unexpected)
        problems.append(
            f"config moe_layers={list(config.moe_layers)}, but the weights have MoE blocks in layers {weight_layers}"
        )
    experts = [(k, ckpt) for k, ckpt, own in mismatched if ckpt[0] != own[0] and ".shared_expert" not in k]
    if experts:
        name, shape = experts[0]
        problems.append(
            f"config num_experts={config.num_experts}, but the weights have {shape[0]} experts "
            f"({name} is {list(shape)})"
        )
    elif mismatched:  # same expert count: the dense or shared-expert sizes differ
        name, shape, own = mismatched[0]
        problems.append(f"{name} is {list(shape)} in the checkpoint, the config implies {list(own)}")
    raise ValueError(
        "The checkpoint's config does not match its weights: " + "; ".join(problems) + ". Loading would "
        "initialise those MoE layers randomly; fix config.json (moe_layers, num_experts, "
        "shared_expert_intermediate_size, text_config) to describe the weights"
    )


def _warn_if_adapter_drops_router_state(model, state_dict, prefix, local_metadata) -> None:
    """State-dict hook of routing methods whose routers learn state besides their weights
    (`RoutingMethod.routers_learn_state`). A PEFT adapter saves only its own tensors and the modules in
    ``modules_to_save``; training moves that state even when the routers are frozen, so an adapter without
    ``modules_to_save=["router"]`` would lose it. Warned once per model, when the adapter's state dict is
    taken (at save)."""
    if "peft_config" not in vars(model) or vars(model).get("_warned_router_state"):
        return
    # A router wrapped by modules_to_save is not a Router here (PEFT then saves it).
    if not any(isinstance(block.router, Router) and block.router.has_trained_state() for block in model.moe_blocks()):
        return
    model.__dict__["_warned_router_state"] = True
    warnings.warn(
        f"{type(model).__name__} has a PEFT adapter without its routers: {model.routing_method.routers_learn_state}, "
        "which training updated, are not saved with the adapter, so a reloaded adapter routes with the base model's. "
        'Create the adapter with modules_to_save=["router"] (as the hf_moe recipes do).',
        UserWarning,
        stacklevel=2,
    )


class MoeDecoder:
    """``model.base_model`` of an hf_moe model: the decoder without the head.

    Calling it runs the model's forward up to the last hidden state (``hidden_states_only``), with
    the routing handled as in a full forward (padding mask, Expert-Choice thresholds, router losses
    and statistics in the output); any other attribute is the dense decoder's (``_tp_plan``,
    ``get_decoder``, embeddings). A view, not a module: it owns no parameters.
    """

    def __init__(self, model: "MoePreTrainedModel"):
        self.__dict__["model"] = model

    def __call__(self, *args, **kwargs) -> MoeModelOutput:
        self._warn_if_router_terms_are_dropped()
        # The class's forward, not the instance's: trainers may patch ``model.forward`` (TRL's fused LM head).
        return type(self.model).forward(self.model, *args, hidden_states_only=True, **kwargs)

    def _warn_if_router_terms_are_dropped(self) -> None:
        """A trainer that patched ``model.forward`` with a fused LM head (TRL's SFTTrainer) and trains through
        the decoder computes its loss from the hidden states: the model's router terms (Switch eq. 4,
        ST-MoE eq. 5) never reach it. TRL adds only Mixtral's balancing loss, from fields the dense text
        config lacks, so it adds none; warned once per model, at the first such forward."""
        model, config = self.model, self.model.config
        weighted = config.router_z_loss_coef or (model.routing_method.balancing_loss and config.router_aux_loss_coef)
        if not (model.training and weighted and "forward" in vars(model)) or vars(model).get("_warned_fused_head"):
            return
        model.__dict__["_warned_fused_head"] = True
        warnings.warn(
            f"{type(model).__name__} is trained through a fused LM head (TRL's SFTTrainer patches its forward): "
            "the loss leaves out the model's router terms (router_aux_loss_coef * aux_loss + router_z_loss_coef "
            "* z_loss), so nothing keeps the experts balanced. Train with hf_moe.training.MoeSFTTrainer, which "
            "adds them once.",
            UserWarning,
            stacklevel=3,
        )

    def __getattr__(self, name: str):
        return getattr(self.model.backbone.base_model, name)


class MoeGenerationMixin(GenerationMixin):
    """Generation through the backbone's caches; the per-step routing statistics are skipped."""

    def prepare_inputs_for_generation(self, *args, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        model_inputs["output_routing_stats"] = False
        return model_inputs
