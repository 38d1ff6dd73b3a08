"""Experts: the dense MLP with an expert dimension on every weight, run as grouped matmuls.

The dense MLP module is kept (its forward, activation and element-wise products are per token);
each of its linear layers is replaced by a grouped version whose weight gains a leading expert
dimension: ``gate_proj.weight [I, H]`` becomes ``experts.gate_proj.weight [E, I, H]``. Called on
the buffer of tokens sorted by expert, each grouped layer multiplies every contiguous group of
rows by its expert's matrix in one ``torch.nn.functional.grouped_mm`` call: no loop over experts.

The module answers transformers' experts interface, ``experts(hidden_states, top_k_index,
top_k_weights)`` (as ``Qwen3MoeExperts`` does), which is what transformers' expert parallelism
(``DistributedConfig(ep_size=...)``, its ``ep_dispatch_experts`` rule) calls on each rank with the
rows routed to that rank's experts.
"""

import copy
import functools
import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:  # builds without torch.distributed have no sharded parameters
    DTensor = ()


class ExpertLayout:
    """Where each expert's rows sit in the sorted token buffer; shared by one block's layers.

    Set by `GroupedExperts.forward` right before it runs the dense MLP's forward.
    """

    def __init__(self):
        self.offsets: torch.Tensor | None = None  # (experts,) int32 cumulative row ends
        self.expert_ids: torch.Tensor | None = None  # (rows,) long, expert of each row
        self.active: slice | None = None  # the experts the grouped matmuls visit; None: all

    def set(self, expert_ids: torch.Tensor, num_experts: int) -> None:
        """``expert_ids`` (rows,) the expert of each row of the buffer, sorted.

        Ids >= ``num_experts`` (experts on other ranks, see `GroupedExperts`) sort to the end, past
        the last offset: the grouped matmuls do not compute those rows.
        """
        # Row ends from a binary search of the sorted ids: no host synchronisation (bincount on
        # CUDA reads its maximum back to size the output). (experts,), cumulative like a cumsum.
        experts = torch.arange(num_experts, device=expert_ids.device, dtype=expert_ids.dtype)
        self.offsets = torch.searchsorted(expert_ids, experts, right=True, out_int32=True)
        self.expert_ids = expert_ids.clamp(max=num_experts - 1)  # in range for the bias lookup
        self.active = None
        if expert_ids.device.type == "cpu" and not torch.is_grad_enabled() and len(expert_ids):
            # On CPU grouped_mm runs one matmul per group, empty groups included (~15 us each);
            # a batch-1 decoding step fills one group. Visiting only the experts from the first to
            # the last non-empty one (a view: no copy) skips them. Reading the range back is a
            # host synchronisation, free on CPU only, hence CPU only. Experts before the first
            # have no rows, so the sliced cumulative offsets still start from row 0. Inference
            # only: under autograd the slice's backward would write the weight gradient twice.
            self.active = slice(int(self.expert_ids[0]), int(self.expert_ids[-1]) + 1)


@torch.compiler.disable
def _grouped_mm_outside_graph(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return nn.functional.grouped_mm(x, weight, offs=offsets)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x`` (rows, in) sorted by expert times ``weight`` (E, in, out) per group -> (rows, out).

    The eager kernels take float32 and bfloat16 alike, but torch's meta kernel of grouped_mm,
    which torch.compile traces, accepts bfloat16 only. Other dtypes therefore run grouped_mm
    eagerly between compiled graphs (a graph break per call; ``fullgraph=True`` needs bfloat16).
    """
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return _grouped_mm_outside_graph(x, weight, offsets)
    return nn.functional.grouped_mm(x, weight, offs=offsets)


class GroupedLinear(nn.Module):
    """``nn.Linear`` with one weight per expert: weight (E, out, in), bias (E, out).

    ``weight_layout="out_in"`` is nn.Linear's orientation; ``"in_out"`` keeps GPT-2's Conv1D
    orientation (E, in, out) so upcycled checkpoints stack the dense tensors unchanged.
    ``input_dropout`` is the expert dropout applied to the input of the experts' output
    projection (Switch Table 4).
    """

    def __init__(
        self, num_experts, in_features, out_features, bias, layout, weight_layout="out_in", dtype=None, device=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_layout = weight_layout
        shape = (
            (num_experts, out_features, in_features)
            if weight_layout == "out_in"
            else (num_experts, in_features, out_features)
        )
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, dtype=dtype, device=device)) if bias else None
        self.layout = layout
        self.input_dropout: nn.Dropout | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (rows, in) sorted by expert -> (rows, out)
        if self.input_dropout is not None and self.input_dropout.p > 0:
            x = self.input_dropout(x)
        weight, bias = self.weight, self.bias
        if isinstance(weight, DTensor):
            # Under expert parallelism the weights are split on the expert dim (Shard(0)); this
            # rank computes with its own slice. transformers hands local tensors only to the
            # parameters of the experts module itself, not to those of its child layers.
            weight, bias = weight.to_local(), bias.to_local() if bias is not None else None
        offsets, active = self.layout.offsets, self.layout.active
        if active is not None:
            weight, offsets = weight[active], offsets[active]
        weight = weight.transpose(-2, -1) if self.weight_layout == "out_in" else weight  # (E, in, out)
        # Under autocast, compute in the autocast dtype as nn.Linear does: grouped_mm is not on
        # autocast's list of ops, so the cast is explicit. Otherwise weights follow the input.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        x = x.to(dtype)
        out = grouped_mm(x, weight.to(dtype), offsets)
        if bias is not None:
            out = out + bias.to(dtype)[self.layout.expert_ids]
        return out

    @property
    def is_output_projection(self) -> bool:
        """The layer writing back to the hidden size: `make_experts` gives it (only) the expert dropout."""
        return self.input_dropout is not None

    def reset_parameters(self, init) -> None:
        """Switch init (Table 3): truncated normal, std sqrt(0.1 / fan_in), cut at 2 std.

        ``init`` is ``transformers.initialization``, whose functions skip loaded tensors.
        """
        std = math.sqrt(0.1 / self.in_features)
        init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std)
        if self.bias is not None:
            init.zeros_(self.bias)

    def extra_repr(self) -> str:
        experts, bias = self.weight.shape[0], self.bias is not None
        return f"experts={experts}, in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


class WeightedScatterAdd(torch.autograd.Function):
    """out[t] = sum of weight[p] * expert_out[p] over the pairs p of row t; 0 for rows without pairs.

    The same values as ``zeros(rows, hidden).index_add_(0, row_idx, expert_out * weight[:, None])``
    with autograd, in fewer passes over (pairs, hidden) buffers: the backward gathers the output
    gradient once, takes the weight gradient from it as a row-wise dot product and scales it in
    place into the expert-output gradient (autograd's index_add and mul backwards allocate three
    such buffers).
    """

    @staticmethod
    def forward(ctx, expert_out, weight, row_idx, num_rows):
        # expert_out (pairs, hidden); weight (pairs,) float32; row_idx (pairs,) long
        ctx.save_for_backward(expert_out, weight, row_idx)
        return WeightedScatterAdd.compute(expert_out, weight, row_idx, num_rows)

    @staticmethod
    def compute(expert_out, weight, row_idx, num_rows):
        """The forward without autograd bookkeeping (also used directly when no gradient is needed)."""
        weighted = expert_out * weight.to(expert_out.dtype)[:, None]
        return expert_out.new_zeros(num_rows, expert_out.shape[1]).index_add_(0, row_idx, weighted)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        expert_out, weight, row_idx = ctx.saved_tensors
        grad = grad_out.index_select(0, row_idx)  # (pairs, hidden)
        grad_weight = torch.linalg.vecdot(grad, expert_out).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_expert_out = grad.mul_(weight.to(grad.dtype)[:, None]) if ctx.needs_input_grad[0] else None
        return grad_expert_out, grad_weight, None, None


class GroupedExperts(nn.Module):
    """The forward of a dense MLP turned into experts: transformers' experts interface.

    `make_experts` puts this class in front of the dense MLP's own class, so ``super().forward``
    is the dense forward and the state-dict keys stay the dense module's (``gate_proj.weight``).

    Attributes set by `make_experts`: ``num_experts``, the experts this module holds (all of them,
    or this rank's share under expert parallelism, where transformers reads it to route tokens);
    ``holds_all_experts``; ``layout``, the `ExpertLayout` its grouped layers share.
    """

    num_experts: int
    holds_all_experts: bool
    layout: ExpertLayout

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``hidden_states`` (rows, hidden); ``top_k_index`` (rows, k) expert ids, local to this module;
        ``top_k_weights`` (rows, k) -> (rows, hidden): row r gets sum_j w[r, j] * E_{index[r, j]}(x_r).

        An id >= ``num_experts`` names an expert held by another rank (transformers' all-reduce
        expert parallelism marks those with weight 0): its pair is skipped and adds exactly 0.
        """
        num_rows, top_k = top_k_index.shape
        # Dispatch: group the pairs by expert; the stable sort keeps row order inside each group.
        expert_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)  # (pairs,)
        row_idx = order.div(top_k, rounding_mode="floor") if top_k > 1 else order
        self.layout.set(expert_ids, self.num_experts)
        # index_select (not advanced indexing): its backward is a plain index_add, about half the
        # cost of index_put with accumulation on CPU.
        x = hidden_states.index_select(0, row_idx)  # (pairs, hidden)
        elsewhere = None if self.holds_all_experts else (expert_ids >= self.num_experts)[:, None]
        if elsewhere is not None:
            # The grouped matmuls leave the rows past the last offset unwritten, in the forward and
            # in the input gradient: zero them on the way in (whose backward zeroes the gradient)
            # and on the way out, so no stale value reaches a sum.
            x = x.masked_fill(elsewhere, 0.0)
        expert_out = super().forward(x)  # (pairs, hidden)
        if elsewhere is not None:
            expert_out = expert_out.masked_fill(elsewhere, 0.0)

        # Combine: weight each pair and add it back to its row.
        weight = top_k_weights.reshape(-1).index_select(0, order)  # (pairs,)
        if torch.is_grad_enabled() and (expert_out.requires_grad or weight.requires_grad):
            return WeightedScatterAdd.apply(expert_out, weight, row_idx, num_rows)
        # no autograd.Function overhead (~30 us) in inference, e.g. each decoding step
        return WeightedScatterAdd.compute(expert_out, weight, row_idx, num_rows)

    def __reduce_ex__(self, protocol):
        # The class is made at run time (`grouped_experts_class`): pickle and deepcopy name the
        # dense class it extends instead, and make the class again from it.
        return _new_grouped_experts, (type(self).__bases__[1],), self.__dict__


def _new_grouped_experts(mlp_class: type) -> GroupedExperts:
    cls = grouped_experts_class(mlp_class)
    return cls.__new__(cls)


@functools.cache
def grouped_experts_class(mlp_class: type) -> type:
    """``GroupedExperts`` in front of a dense MLP class; created once per class."""
    return type(mlp_class.__name__ + "Experts", (GroupedExperts, mlp_class), {"__module__": __name__})


def _linear_dims(module: nn.Module) -> tuple[int, int, str]:
    """(in, out, weight layout) of a dense linear layer."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf, "in_out"
    return module.in_features, module.out_features, "out_in"


def dense_linear_layers(mlp: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in mlp.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _output_layers(linears: list[tuple[str, nn.Module]], hidden_size: int) -> list[str]:
    """Names of the layers writing back to the hidden size (an MLP has exactly one)."""
    return [name for name, m in linears if _linear_dims(m)[1] == hidden_size]


def narrowed_dims(
    name: str, in_features: int, out_features: int, output_layer: str, dense_width: int, width: int, what: str
) -> tuple[int, int]:
    """(in, out) of MLP layer ``name`` when the MLP's ``dense_width`` intermediate neurons become ``width``:
    the output projection's input shrinks; every other layer's outputs (one block of neurons, or several
    fused, as phi3's gate_up_proj) shrink per block. ``what`` names the module being built in the error."""
    if name == output_layer:
        return width, out_features
    if out_features % dense_width:
        raise ValueError(
            f"Cannot build {what}: {name} has {out_features} outputs, not a multiple of the MLP's intermediate "
            f"size {dense_width}"
        )
    return in_features, out_features // dense_width * width


def mlp_intermediate_size(mlp: nn.Module, hidden_size: int) -> int | None:
    """The intermediate width I of a dense MLP: the input size of its output projection (None when
    the MLP has no single output projection)."""
    linears = dense_linear_layers(mlp)
    output_layers = _output_layers(linears, hidden_size)
    if len(output_layers) != 1:
        return None
    return _linear_dims(mlp.get_submodule(output_layers[0]))[0]


def make_experts(
    mlp: nn.Module,
    num_experts: int,
    hidden_size: int,
    expert_dropout: float,
    model_type: str,
    expert_parallel_size: int = 1,
    intermediate_size: int | None = None,
) -> GroupedExperts:
    """Turn a dense MLP module in place into E experts; returns the same module object, now a
    `GroupedExperts`.

    Every weight holds all E experts; under expert parallelism (``expert_parallel_size`` ranks)
    transformers then splits them on the expert dim, and this module is told its share now.
    ``intermediate_size`` (the config's ``moe_intermediate_size``; None: the dense MLP's own width I)
    is the experts' width: every dimension indexed by intermediate neurons shrinks to it, the output
    projection's input and the input projections' outputs (a fused gate/up projection of 2I outputs
    gets 2 * intermediate_size), as fine-grained experts narrower than the dense MLP (Dai et al. 2024,
    "DeepSeekMoE", §3.1; transformers' ``moe_intermediate_size``).
    Raises a ValueError naming the backbone when the MLP's linear layers cannot be identified.
    """
    linears = dense_linear_layers(mlp)
    if not linears:
        raise ValueError(
            f"Cannot build experts for model_type {model_type!r}: its feed-forward block {type(mlp).__name__} "
            "has no nn.Linear or Conv1D layer to give an expert dimension"
        )
    output_layers = _output_layers(linears, hidden_size)
    if len(output_layers) != 1:
        raise ValueError(
            f"Cannot build experts for model_type {model_type!r}: expected exactly one output projection "
            f"(a linear layer with out_features == hidden_size {hidden_size}) in {type(mlp).__name__}, "
            f"found {output_layers or 'none'}"
        )
    dense_width = _linear_dims(mlp.get_submodule(output_layers[0]))[0]
    width = intermediate_size or dense_width
    layout = ExpertLayout()
    for name, dense in linears:
        in_features, out_features, weight_layout = _linear_dims(dense)
        if width != dense_width:
            what = f"experts of moe_intermediate_size {width} for model_type {model_type!r}"
            in_features, out_features = narrowed_dims(
                name, in_features, out_features, output_layers[0], dense_width, width, what
            )
        grouped = GroupedLinear(
            num_experts,
            in_features,
            out_features,
            dense.bias is not None,
            layout,
            weight_layout,
            dtype=dense.weight.dtype,
            device=dense.weight.device,
        )
        if name == output_layers[0]:
            grouped.input_dropout = nn.Dropout(expert_dropout)
        parent_name, _, child = name.rpartition(".")
        setattr(mlp.get_submodule(parent_name) if parent_name else mlp, child, grouped)
    # The same module object keeps its children (and so its state-dict keys); only its class changes,
    # as torch's fully_shard does with FSDPModule.
    mlp.__class__ = grouped_experts_class(type(mlp))
    mlp.num_experts = num_experts // expert_parallel_size
    mlp.holds_all_experts = expert_parallel_size == 1
    mlp.layout = layout
    return mlp


def make_shared_expert(mlp: nn.Module, intermediate_size: int, hidden_size: int, model_type: str) -> nn.Module:
    """A new module of the dense MLP's own class with ``intermediate_size`` neurons: the shared expert.

    Built from ``mlp`` before it becomes the routed experts: a copy whose input projections get
    ``intermediate_size`` output rows per neuron group (phi3's fused ``gate_up_proj`` has two) and whose
    output projection (the one layer writing back to ``hidden_size``) gets ``intermediate_size`` inputs.
    Its weights are fresh (initialised or loaded by the model). Raises a ValueError naming the backbone
    when the MLP's intermediate neurons cannot be identified.
    """
    linears = dense_linear_layers(mlp)
    output_layers = _output_layers(linears, hidden_size)
    if len(output_layers) != 1:
        raise ValueError(
            f"Cannot build a shared expert for model_type {model_type!r}: expected exactly one output projection "
            f"(a linear layer with out_features == hidden_size {hidden_size}) in {type(mlp).__name__}, "
            f"found {output_layers or 'none'}"
        )
    dense_width = _linear_dims(dict(linears)[output_layers[0]])[0]
    # Plain attributes (the backbone's config) stay shared with the dense MLP; modules and weights are copied.
    shared = {id(value): value for key, value in vars(mlp).items() if not key.startswith("_")}
    expert = copy.deepcopy(mlp, memo=shared)
    for name, dense in dense_linear_layers(expert):
        in_features, out_features, weight_layout = _linear_dims(dense)
        what = f"a shared expert for model_type {model_type!r}"
        in_features, out_features = narrowed_dims(
            name, in_features, out_features, output_layers[0], dense_width, intermediate_size, what
        )
        weight = dense.weight
        if weight_layout == "in_out":
            narrowed = Conv1D(out_features, in_features).to(device=weight.device, dtype=weight.dtype)
        else:
            narrowed = nn.Linear(
                in_features, out_features, bias=dense.bias is not None, device=weight.device, dtype=weight.dtype
            )
        parent_name, _, child = name.rpartition(".")
        setattr(expert.get_submodule(parent_name) if parent_name else expert, child, narrowed)
    if isinstance(getattr(expert, "intermediate_size", None), int):
        expert.intermediate_size = intermediate_size
    return expert
