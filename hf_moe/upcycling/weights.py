"""Dense -> MoE tensor mapping and expert initialisation, shared by both conversion APIs.

The mapping is read off meta-device models, never hard-coded: the dense model of the source's
head and the MoE model of the same head are built on the meta device, and every MoE tensor is
derived from the dense tensor with the same qualified name (``backbone.`` + dense name), where
for each MoE layer the dense feed-forward block ``F`` became:

- ``F.experts.<linear>.weight`` [E, *dense shape]: one copy of ``F.<linear>.weight`` per expert,
  optionally perturbed (``noise``) or partially re-initialised (``drop``);
- ``F.router.weight`` [E, hidden]: fresh N(0, router_init_std^2), seeded;
- expert-choice buffers ``F.router.score_thresholds`` / ``threshold_updates``: zeros;
- with a shared expert (``shared_expert_intermediate_size`` S): ``F.shared_expert.<linear>.*`` the first
  S intermediate neurons of ``F.<linear>.*`` (the whole FFN when S is its width), the routed experts'
  output projection zero on those S neurons and without bias (the shared expert keeps it), and, when
  gated, ``F.shared_expert_gate.weight`` zeros with the shared output projection doubled
  (sigmoid(0) * 2 = 1, exact in floating point). See `shared_expert_init`.

All random draws use generators seeded from (seed, tensor name, expert), so the result does not
depend on the order tensors are produced in: directory and in-memory conversion agree bit for bit.
"""

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import CONFIG_MAPPING, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from ..checkpoints.streaming import OutputTensor
from ..modeling import find_feed_forward_blocks
from ..modeling.experts import GroupedLinear, mlp_intermediate_size
from ..modeling.registry import routing_method_of
from .native import FAMILIES_BY_NATIVE, is_moe_model_type
from .settings import UpcyclingSettings

# Backbones the test-suite converts; any decoder whose feed-forward block `find_feed_forward_blocks`
# finds and whose MLP is built from linear layers works the same way.
TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "olmo2", "gpt2")
HEADS = ("model", "causal_lm", "sequence_classification")
DENSE_AUTO_CLASSES = (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification)
BACKBONE_PREFIX = "backbone."


def head_of(class_name: str) -> int:
    """Index into HEADS of a dense architecture name (``config.architectures[0]`` or a class name)."""
    if class_name.endswith("ForSequenceClassification"):
        return 2
    if class_name.endswith(("ForCausalLM", "LMHeadModel")):
        return 1
    if class_name.endswith("Model"):
        return 0
    raise ValueError(
        f"Cannot upcycle architecture {class_name!r}: supported heads are *Model, *ForCausalLM (or *LMHeadModel) "
        "and *ForSequenceClassification"
    )


def unsupported_architecture(model_type, reason: str) -> ValueError:
    return ValueError(
        f"Unknown architecture: cannot upcycle model_type {model_type!r} ({reason}). "
        f"Supported (tested) model types: {list(TESTED_MODEL_TYPES)}; other transformers decoders whose "
        "feed-forward block is a module named mlp/feed_forward/ffn built from linear layers also work"
    )


# Config fields that give a native MoE checkpoint away (Mixtral, Qwen2/3-MoE, DeepSeek, DBRX, OLMoE, ...).
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def check_model_type(model_type, config: dict | None = None) -> None:
    """Refuse sources that are not dense transformers decoders; ``config`` is the source's config as a dict."""
    if routing_method_of(model_type) is not None:
        raise ValueError(
            f"The source is already an hf_moe model (model_type {model_type!r}); upcycle a dense checkpoint"
        )
    experts = {k: v for k, v in (config or {}).items() if k in EXPERT_COUNT_FIELDS and isinstance(v, int) and v > 1}
    if experts or is_moe_model_type(model_type):
        found = "".join(f", {k}={v}" for k, v in experts.items())
        raise ValueError(
            f"The source is already a Mixture-of-Experts model (model_type {model_type!r}{found}); upcycling "
            "turns a dense checkpoint into an MoE one. `hf-moe import SOURCE OUTPUT_DIR` turns native "
            f"{list(FAMILIES_BY_NATIVE)} checkpoints into hf_moe checkpoints"
        )
    if model_type not in CONFIG_MAPPING:
        raise unsupported_architecture(model_type, "transformers does not know it")


@dataclass(frozen=True)
class ExpertWeight:
    """How one dense feed-forward tensor is indexed by intermediate neurons (for Drop-Upcycling and
    fine-grained shards).

    A fused input projection (phi3 ``gate_up_proj``: rows [0, I) gate, [I, 2I) up) has
    ``neuron_groups=2``: neuron j owns rows j and I + j. ``neuron_axis`` is None for tensors not
    indexed by neurons (the output projection's bias). ``intermediate_size`` is the experts' width,
    ``granularity`` G the number of shards of the dense MLP's width it is (I / G each; None when the
    experts' width does not divide the dense one, so no expert is a shard of it), and
    ``output`` marks the tensors of the layer writing back to the hidden size.
    """

    layer: int
    intermediate_size: int
    neuron_axis: int | None
    neuron_groups: int
    granularity: int | None = 1
    output: bool = False  # a tensor of the output projection (the layer writing back to the hidden size)


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the MoE checkpoint and where it comes from."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "copy" | "experts" | "router" | "zeros" | "shared" | "zero_weight"
    # copy / experts / shared: the dense tensor; router / zero_weight: the block's output weight (for its dtype)
    dense_name: str | None = None
    fixed_dtype: torch.dtype | None = None  # zeros: the buffer's own dtype
    expert: ExpertWeight | None = None


@dataclass
class ConversionPlan:
    """Everything the conversion needs to know, derived from meta-device models."""

    config: object  # the MoE config
    moe_class: type
    tensors: list[TensorPlan]
    dense_shapes: dict[str, tuple[int, ...]]  # every tensor the dense checkpoint must provide
    dense_tied: set[str]  # dense names that are tied copies (absent from checkpoints)
    dense_prefix: str  # base_model_prefix of the dense head model
    dense_ignored: tuple[str, ...]  # regexes of dense checkpoint keys transformers ignores on load
    feed_forward_blocks: dict[int, str]  # MoE layer -> dense qualified name of its feed-forward block
    meta_dense: torch.nn.Module
    meta_moe: torch.nn.Module


def plan_conversion(moe_config, head: int) -> ConversionPlan:
    """Build the dense and MoE models of ``head`` on the meta device and map every MoE tensor."""
    text_config = moe_config.text_config
    check_model_type(text_config.model_type, text_config.to_dict())
    moe_class = routing_method_of(moe_config).model_classes[head]
    with torch.device("meta"):
        dense = DENSE_AUTO_CLASSES[head].from_config(text_config)
        try:
            blocks = find_feed_forward_blocks(dense, text_config)
            moe = moe_class(moe_config)
        except ValueError as error:
            raise unsupported_architecture(text_config.model_type, str(error)) from None
    dense_state = dense.state_dict()
    dense_tied = set(getattr(dense, "all_tied_weights_keys", {}) or {})
    moe_tied = set(getattr(moe, "all_tied_weights_keys", {}) or {})
    moe_blocks = {index: blocks[index] for index in moe_config.moe_layers}
    layer_of_block = {name: index for index, name in moe_blocks.items()}
    num_experts = moe_config.num_experts

    tensors = []
    for name, tensor in moe.state_dict().items():
        if name in moe_tied:
            continue
        dense_name = name[len(BACKBONE_PREFIX) :]
        layer, rest = _moe_block_of(dense_name, layer_of_block)
        if layer is None:
            tensors.append(TensorPlan(name, tuple(tensor.shape), "copy", dense_name))
            continue
        block_name = moe_blocks[layer]
        output_weight = _output_projection(moe, block_name).removeprefix("experts.") + ".weight"
        if rest == "router.weight":
            # The router takes the dtype of the block's output projection.
            tensors.append(TensorPlan(name, tuple(tensor.shape), "router", f"{block_name}.{output_weight}"))
        elif rest == "shared_expert_gate.weight":  # zeros in the dtype of the block's output projection
            tensors.append(TensorPlan(name, tuple(tensor.shape), "zero_weight", f"{block_name}.{output_weight}"))
        elif rest.startswith("shared_expert."):
            inner = rest[len("shared_expert.") :]
            module_name, _, param = inner.rpartition(".")
            source = f"{block_name}.{inner}"
            routed = moe.get_submodule(f"{BACKBONE_PREFIX}{block_name}.experts.{module_name}")
            dense_width = mlp_intermediate_size(dense.get_submodule(block_name), text_config.hidden_size)
            expert = _expert_weight(moe, block_name, layer, routed, param, dense_width)
            expected = _shared_shape(dense_state[source].shape, expert, moe_config.shared_expert_intermediate_size)
            if tuple(tensor.shape) != expected:
                raise RuntimeError(f"{name} has shape {list(tensor.shape)}, not the shared slice {list(expected)}")
            tensors.append(TensorPlan(name, tuple(tensor.shape), "shared", source, expert=expert))
        elif rest.startswith("router."):
            tensors.append(TensorPlan(name, tuple(tensor.shape), "zeros", fixed_dtype=tensor.dtype))
        elif rest.startswith("experts."):
            inner = rest[len("experts.") :]
            module_name, _, param = inner.rpartition(".")
            module = moe.get_submodule(f"{BACKBONE_PREFIX}{block_name}.experts.{module_name}")
            source = f"{block_name}.{inner}"
            if isinstance(module, GroupedLinear):
                dense_width = mlp_intermediate_size(dense.get_submodule(block_name), text_config.hidden_size)
                expert = _expert_weight(moe, block_name, layer, module, param, dense_width)
                shard_shape = _shard_shape(dense_state[source].shape, expert)
                if shard_shape is not None and tuple(tensor.shape) != (num_experts, *shard_shape):
                    raise RuntimeError(f"{name} has shape {list(tensor.shape)}, not experts x {list(shard_shape)}")
                tensors.append(TensorPlan(name, tuple(tensor.shape), "experts", source, expert=expert))
            else:  # a non-linear parameter of the MLP stays shared
                tensors.append(TensorPlan(name, tuple(tensor.shape), "copy", source))
        else:
            raise RuntimeError(f"Unexpected tensor {name} in the MoE block of layer {layer}")
    dense_shapes = {k: tuple(v.shape) for k, v in dense_state.items() if k not in dense_tied}
    return ConversionPlan(
        config=moe_config,
        moe_class=moe_class,
        tensors=tensors,
        dense_shapes=dense_shapes,
        dense_tied=dense_tied,
        dense_prefix=dense.base_model_prefix,
        dense_ignored=tuple(getattr(dense, "_keys_to_ignore_on_load_unexpected", None) or ()),
        feed_forward_blocks=moe_blocks,
        meta_dense=dense,
        meta_moe=moe,
    )


def _moe_block_of(dense_name: str, layer_of_block: dict[str, int]) -> tuple[int | None, str]:
    """(MoE layer, name inside its block) of a tensor, or (None, ""); one lookup per name prefix."""
    parts = dense_name.split(".")
    for end in range(1, len(parts)):
        layer = layer_of_block.get(".".join(parts[:end]))
        if layer is not None:
            return layer, ".".join(parts[end:])
    return None, ""


def check_layer_count(text_config, tensor_names, folder) -> None:
    """Refuse a config with more layers than the checkpoint has tensors (every layer has weights of
    its own) before `plan_conversion` builds the models, which takes time per layer: a config edited
    to 200000 layers would otherwise keep the converter busy for hours."""
    layers = getattr(text_config, "num_hidden_layers", None)
    count = len(tensor_names)
    if isinstance(layers, int) and layers > count:
        raise ValueError(
            f"The checkpoint does not match its config: num_hidden_layers={layers}, but {folder} holds only "
            f"{count} tensors, and every layer has weights of its own. Fix num_hidden_layers in config.json"
        )


def _output_projection(moe, block_name: str) -> str:
    """Name (inside the experts module) of the layer writing back to the hidden size."""
    experts = moe.get_submodule(f"{BACKBONE_PREFIX}{block_name}.experts")
    return "experts." + next(
        n for n, m in experts.named_modules() if isinstance(m, GroupedLinear) and m.is_output_projection
    )


def _expert_weight(
    moe, block_name: str, layer: int, module: GroupedLinear, param: str, dense_width: int | None
) -> ExpertWeight:
    output = moe.get_submodule(f"{BACKBONE_PREFIX}{block_name}.{_output_projection(moe, block_name)}")
    intermediate = output.in_features
    granularity = dense_width // intermediate if dense_width and dense_width % intermediate == 0 else None
    out_in = module.weight_layout == "out_in"  # dense weight [out, in]; Conv1D [in, out]
    if module is output:
        axis = (1 if out_in else 0) if param == "weight" else None
        return ExpertWeight(layer, intermediate, axis, 1, granularity, output=True)
    groups = module.out_features // intermediate if module.out_features % intermediate == 0 else 0
    axis = (0 if out_in else 1) if param == "weight" else 0
    return ExpertWeight(layer, intermediate, axis, groups, granularity)


def _shard_shape(dense_shape, info: ExpertWeight) -> tuple[int, ...] | None:
    """The shape of one shard of a dense tensor (the dense shape when G = 1); None when the experts are
    not shards of the dense MLP."""
    if info.granularity is None:
        return None
    shape = list(dense_shape)
    if info.neuron_axis is not None:
        shape[info.neuron_axis] //= info.granularity
    return tuple(shape)


def dense_shard(dense: torch.Tensor, info: ExpertWeight, shard: int) -> torch.Tensor:
    """Shard ``shard`` of G of a dense feed-forward tensor: the intermediate neurons
    [shard * I/G, (shard + 1) * I/G) of each neuron group (rows of gate/up, columns of down); a tensor
    not indexed by neurons (the output projection's bias) whole."""
    if info.granularity == 1 or info.neuron_axis is None:
        return dense
    width = info.intermediate_size  # I / G
    dense_width = width * info.granularity
    parts = [
        dense.narrow(info.neuron_axis, group * dense_width + shard * width, width)
        for group in range(info.neuron_groups)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=info.neuron_axis)


def match_source_names(plan: ConversionPlan, source_names) -> dict[str, str]:
    """Dense name -> name in the checkpoint. Accepts checkpoints saved with or without the head's
    ``base_model_prefix`` (e.g. the original GPT-2 checkpoints); skips tied copies and keys
    transformers itself ignores; anything else unknown, or missing, is an error."""
    mapping, unexpected = {}, []
    prefix = plan.dense_prefix + "."
    for name in source_names:
        candidates = (name, prefix + name, name[len(prefix) :] if name.startswith(prefix) else None)
        dense_name = next((c for c in candidates if c in plan.dense_shapes or c in plan.dense_tied), None)
        if dense_name is None:
            if not any(re.search(pattern, name) for pattern in plan.dense_ignored):
                unexpected.append(name)
        elif dense_name in plan.dense_shapes:
            mapping[dense_name] = name
    missing = sorted(set(plan.dense_shapes) - set(mapping))
    problems = []
    model_type = plan.config.text_config.model_type
    if missing:
        problems.append(f"missing tensors the {model_type} config requires: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors the {model_type} config does not have: {_preview(unexpected)}")
    if problems:
        raise ValueError("The dense checkpoint does not match its config:\n  - " + "\n  - ".join(problems))
    return mapping


def check_shapes(plan: ConversionPlan, shape_of: Callable[[str], tuple[int, ...]], mapping: dict[str, str]) -> None:
    bad = [
        f"{source} is {list(shape_of(source))}, the config implies {list(plan.dense_shapes[dense])}"
        for dense, source in mapping.items()
        if tuple(shape_of(source)) != plan.dense_shapes[dense]
    ]
    if bad:
        raise ValueError(
            "Mismatched shapes between the dense checkpoint and its config:\n  - " + "\n  - ".join(bad[:20])
        )


def check_dtypes(plan: ConversionPlan, dtype_of: Callable[[str], torch.dtype], mapping: dict[str, str]) -> None:
    """Weights the dense model holds in floating point must be floating point in the checkpoint too."""
    expected = {name: tensor.dtype for name, tensor in plan.meta_dense.state_dict().items()}
    check_floating(expected, dtype_of, mapping, plan.config.text_config.model_type)


def check_floating(
    expected: dict[str, torch.dtype], dtype_of: Callable[[str], torch.dtype], mapping: dict[str, str], model_type: str
) -> None:
    """Every conversion's dtype check: a tensor the model holds in floating point (``expected``, by
    model name) must be floating point in the checkpoint (``mapping``: model name -> checkpoint name)."""
    bad = [
        f"{source} is {str(dtype_of(source)).removeprefix('torch.')}"
        for name, source in mapping.items()
        if expected[name].is_floating_point and not dtype_of(source).is_floating_point
    ]
    if bad:
        raise TypeError(
            f"The checkpoint has non-floating-point weights where the {model_type} model has floating-point ones "
            "(quantised or corrupt checkpoints cannot be converted; dequantise first):\n  - " + "\n  - ".join(bad[:20])
        )


def _preview(names: list[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def resolve_dtype(source_dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """``--dtype`` applies to floating tensors; integer buffers keep their type."""
    return target if target is not None and source_dtype.is_floating_point else source_dtype


def output_tensors(
    plan: ConversionPlan, dtype_of: Callable[[str], torch.dtype], target: torch.dtype | None
) -> list[OutputTensor]:
    """Name, dtype and shape of every MoE tensor, known before any is produced."""
    result = []
    for t in plan.tensors:
        dtype = t.fixed_dtype if t.kind == "zeros" else resolve_dtype(dtype_of(t.dense_name), target)
        result.append(OutputTensor(t.name, dtype, t.shape))
    return result


def _generator(seed: int, *parts) -> torch.Generator:
    """A generator that depends only on (seed, parts): order-independent, reproducible."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def dropped_neurons(seed: int, layer: int, expert: int, intermediate_size: int, ratio: float) -> torch.Tensor:
    """Sorted indices of the intermediate neurons expert ``expert`` of ``layer`` re-initialises;
    the same set for every projection of that expert (Drop-Upcycling)."""
    count = round(ratio * intermediate_size)
    chosen = torch.randperm(intermediate_size, generator=_generator(seed, "drop", layer, expert))[:count]
    return chosen.sort().values


def _noised(dense: torch.Tensor, name: str, expert: int, settings: UpcyclingSettings) -> torch.Tensor:
    if dense.dim() < 2:  # biases stay copies; noise perturbs the weight matrices
        return dense
    weight = dense.float()
    noise = torch.randn(weight.shape, generator=_generator(settings.seed, "noise", name, expert))
    return weight + noise * (settings.noise_std * weight.std())


def _dropped(
    dense: torch.Tensor, name: str, expert: int, info: ExpertWeight, settings: UpcyclingSettings
) -> torch.Tensor:
    if info.neuron_axis is None:
        return dense
    if info.neuron_groups == 0:
        raise ValueError(
            f"expert_init='drop' cannot find the intermediate neurons of {name}: its size {list(dense.shape)} "
            f"is not a multiple of the intermediate size {info.intermediate_size}"
        )
    neurons = dropped_neurons(settings.seed, info.layer, expert, info.intermediate_size, settings.drop_ratio)
    if neurons.numel() == 0:
        return dense
    index = torch.cat([neurons + g * info.intermediate_size for g in range(info.neuron_groups)])
    weight = dense.float().clone()
    replaced = weight.index_select(info.neuron_axis, index)
    # Statistics of the replaced weights (Nakamura et al. 2025, §3).
    std = replaced.std() if replaced.numel() > 1 else torch.tensor(0.0)
    fresh = (
        torch.randn(replaced.shape, generator=_generator(settings.seed, "drop", name, expert)) * std + replaced.mean()
    )
    return weight.index_copy_(info.neuron_axis, index, fresh)


def expert_copy(
    dense: torch.Tensor, name: str, expert: int, info: ExpertWeight, settings: UpcyclingSettings
) -> torch.Tensor:
    """Expert ``expert``'s version of dense tensor ``name`` under the settings' init scheme."""
    if settings.expert_init == "noise":
        return _noised(dense, name, expert, settings)
    if settings.expert_init == "drop":
        return _dropped(dense, name, expert, info, settings)
    return dense


def _shared_shape(dense_shape, info: ExpertWeight, width: int) -> tuple[int, ...]:
    shape = list(dense_shape)
    if info.neuron_axis is not None:
        shape[info.neuron_axis] = width * max(info.neuron_groups, 1)
    return tuple(shape)


def _neurons(info: ExpertWeight, count: int) -> torch.Tensor:
    """Indices along ``info.neuron_axis`` of the first ``count`` intermediate neurons (of every group)."""
    return torch.cat([torch.arange(count) + g * info.intermediate_size for g in range(max(info.neuron_groups, 1))])


def shared_expert_init(dense: torch.Tensor, info: ExpertWeight, config) -> torch.Tensor:
    """The shared expert's version of a dense FFN tensor: its first S intermediate neurons.

    The upcycled block computes shared(x) + sum_j w_j routed_j(x). A dense FFN is a sum over its
    neurons, F(x) = sum_n down[:, n] * act_n(x) (+ output bias), so with the shared expert holding
    neurons [0, S) and the output bias, and every routed expert's output projection zero on those
    neurons and without bias (`routed_expert_init`), copies of the rest give
    F(x) = shared(x) + sum_j w_j rest(x) whenever the gates sum to 1 (renormalised top-k, dropless).
    With S the whole FFN the routed experts add exactly 0, so every routing and expert init keeps the
    dense function. Qwen2-MoE's gate sigmoid(g.x) starts at g = 0, i.e. 0.5: the output projection is
    doubled, and 0.5 * (2W)h = Wh exactly in floating point (a power-of-two scaling).
    """
    if info.neuron_axis is not None:
        dense = dense.index_select(info.neuron_axis, _neurons(info, config.shared_expert_intermediate_size))
    if info.output and config.shared_expert_gate:
        dense = dense * 2
    return dense


def routed_expert_init(expert: torch.Tensor, info: ExpertWeight, config) -> torch.Tensor:
    """A routed expert's output projection next to a shared expert: zero on the neurons the shared expert
    holds, and no output bias (the shared expert adds it once); see `shared_expert_init`."""
    if not (getattr(config, "shared_expert_intermediate_size", None) and info.output):
        return expert
    if info.neuron_axis is None:
        return torch.zeros_like(expert)
    neurons = _neurons(info, config.shared_expert_intermediate_size)
    return expert.index_fill(info.neuron_axis, neurons, 0.0)


def dense_intermediate_size(plan: "ConversionPlan") -> int | None:
    """The dense FFN's intermediate size, read off the plan's expert tensors (None without MoE layers)."""
    return next((t.expert.intermediate_size for t in plan.tensors if t.kind == "experts"), None)


def granular_experts(
    dense: torch.Tensor,
    name: str,
    info: ExpertWeight,
    settings: UpcyclingSettings,
    num_experts: int,
    dtype: torch.dtype,
) -> Iterator[torch.Tensor]:
    """Every expert's version of dense tensor ``name``, in expert order; with granularity G, expert
    ``e * G + g`` is shard g of copy e (virtual group e).

    Fine-grained upcycling with the paper's "virtual group" initialisation and weight scaling (He et al.
    2024, "Upcycling Large Language Models into Mixture of Experts", arXiv 2410.07524; as implemented in
    Megatron-Core's ``megatron/core/transformer/moe/upcycling_utils.py``). A dense MLP
    F(x) = W_down a(W_gate x, W_up x) + b splits along its intermediate neurons into G shards,
    F(x) = sum_g W_down[:, g] a_g(x) + b, where shard g keeps rows g of W_gate / W_up (and their biases)
    and columns g of W_down. With E groups of G shards, E * G experts of width I / G:

    1. Router: the G experts of group e share one router row r_e (`produce`), so their logits, and
       their softmax probabilities p_e / G (the softmax over E * G logits equals the softmax over the
       E group logits divided by G), are equal.
    2. Top-(k * G) then selects whole groups, k of them: every member of a group has the same
       logit, so any logit above the k-th group's is above all of that group (equal logits are taken
       together; a tie between two groups' logits is the only way to split a group, and a router
       draw from a continuous distribution gives none).
    3. Renormalised over the selected experts (``norm_topk_prob=True``), each expert of a selected group
       gets w_e = (p_e / G) / (sum_{e' selected} p_e') = p_e / (G * P), with P the selected groups'
       probability mass.
    4. Expert (e, g) computes G * W_down[:, g] a_g(x) + b: its output projection's weight is scaled by
       G and its bias is not. The block then computes
       sum_{e selected} sum_g p_e / (G P) * (G W_down[:, g] a_g(x) + b)
         = sum_{e selected} p_e / P * (sum_g W_down[:, g] a_g(x) + b) = F(x),
       exactly, with copies (every group the dense MLP), for any activation, and dropless.

    Megatron-Core initialises the router the same way (the first E rows, each repeated G times) and
    orders experts the same way (shards 0..G-1 of copy 0, then of copy 1, ...). For its
    topK-then-softmax router (renormalised, as here) it scales by G too, but spreads the factor over
    both projections (G^(1/3) on each of fc1 and fc2 for gated units, G^(1/2) otherwise), which is
    exact only for positively homogeneous activations (ReLU, squared ReLU); scaling the output
    projection alone is exact for SiLU and GELU too. For raw softmax-then-topK gates (the paper's
    preferred router) Megatron-Core scales by E * G^2 / T (T = k * G), which gives the dense output only
    for uniform router probabilities, so not exactly. Here raw gates (``norm_topk_prob=False``) with the
    factor G compute exactly what coarse (G = 1) raw-gate upcycling computes with the same E router
    rows, the sum of the selected groups' probabilities times F(x), which is not the dense function
    (measured, not asserted, by ``verify``). ``noise`` and ``drop`` apply per expert, to its shard, before the scaling.
    """
    granularity = info.granularity
    if granularity is None:
        raise ValueError(
            f"Cannot upcycle {name}: the experts' width {info.intermediate_size} does not divide the dense MLP's"
        )
    for expert in range(num_experts):
        shard = dense_shard(dense, info, expert % granularity)
        weight = expert_copy(shard, name, expert, info, settings)
        if granularity > 1 and info.output and info.neuron_axis is not None:
            weight = weight.float() * granularity
        yield weight.to(dtype)


def produce(
    tensor: TensorPlan,
    out: OutputTensor,
    read_dense: Callable[[str], torch.Tensor],
    settings: UpcyclingSettings,
    config,
) -> Iterator[torch.Tensor]:
    """The chunks of one MoE tensor, concatenated along dim 0 (one per expert for expert weights)."""
    if tensor.kind == "copy":
        yield read_dense(tensor.dense_name).to(out.dtype)
    elif tensor.kind == "experts":
        dense = read_dense(tensor.dense_name)
        for routed in granular_experts(
            dense, tensor.dense_name, tensor.expert, settings, config.num_experts, out.dtype
        ):
            yield routed_expert_init(routed, tensor.expert, config)
    elif tensor.kind == "shared":
        yield shared_expert_init(read_dense(tensor.dense_name), tensor.expert, config).to(out.dtype)
    elif tensor.kind == "router":
        # Virtual groups: the G experts of a group share one router row (G = 1: one row per expert).
        generator = _generator(settings.seed, "router", tensor.name)
        groups = (tensor.shape[0] // settings.granularity, *tensor.shape[1:])
        rows = torch.randn(groups, generator=generator) * config.router_init_std
        yield rows.repeat_interleave(settings.granularity, dim=0).to(out.dtype)
    else:
        yield torch.zeros(tensor.shape, dtype=out.dtype)


def materialize(chunks: Iterator[torch.Tensor], out: OutputTensor) -> torch.Tensor:
    """Join the chunks of `produce` into the full tensor (in-memory conversion and verification)."""
    parts = list(chunks)
    if len(parts) == 1:
        return parts[0].reshape(out.shape)
    return torch.stack(parts)


def parameter_counts(plan: ConversionPlan) -> tuple[int, int]:
    """(total, active per token) parameters of the MoE model; tied tensors count once.

    Active counts the experts a token uses: k of E for token choice, on average
    ``capacity_factor`` of E for expert choice (C = c * T / E tokens per expert).
    """
    config = plan.config
    total = sum(p.numel() for p in plan.meta_moe.parameters())
    expert_params = sum(
        p.numel() for m in plan.meta_moe.modules() if isinstance(m, GroupedLinear) for p in m.parameters()
    )
    per_token = routing_method_of(config).experts_per_token(config)
    return total, round(total - expert_params + expert_params * per_token / config.num_experts)
