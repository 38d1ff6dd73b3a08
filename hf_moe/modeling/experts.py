"""Experts: the dense MLP with an expert dimension on every weight, run as grouped matmuls.

The dense MLP module is kept (its forward, activation and element-wise products are per token);
each of its linear layers is replaced by a grouped version whose weight gains a leading expert
dimension: ``gate_proj.weight [I, H]`` becomes ``experts.gate_proj.weight [E, I, H]``. Called on
the buffer of tokens sorted by expert, each grouped layer multiplies every contiguous group of
rows by its expert's matrix in one ``torch.nn.functional.grouped_mm`` call: no loop over experts.
"""

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class ExpertLayout:
    """Where each expert's rows sit in the sorted token buffer; shared by one block's layers.

    Set by `MoeBlock` right before it calls the experts.
    """

    def __init__(self):
        self.offsets: torch.Tensor | None = None  # (experts,) int32 cumulative row ends
        self.expert_ids: torch.Tensor | None = None  # (rows,) long, expert of each row
        self.active: slice | None = None  # the experts the grouped matmuls visit; None: all

    def set(self, expert_ids: torch.Tensor, num_experts: int) -> None:
        """``expert_ids`` (rows,) the expert of each row of the buffer, sorted."""
        # Row ends from a binary search of the sorted ids: no host synchronisation (bincount on
        # CUDA reads its maximum back to size the output). (experts,), cumulative like a cumsum.
        experts = torch.arange(num_experts, device=expert_ids.device, dtype=expert_ids.dtype)
        self.offsets = torch.searchsorted(expert_ids, experts, right=True, out_int32=True)
        self.expert_ids = expert_ids
        self.active = None
        if expert_ids.device.type == "cpu" and not torch.is_grad_enabled() and len(expert_ids):
            # On CPU grouped_mm runs one matmul per group, empty groups included (~15 us each);
            # a batch-1 decoding step fills one group. Visiting only the experts from the first to
            # the last non-empty one (a view: no copy) skips them. Reading the range back is a
            # host synchronisation, free on CPU only, hence CPU only. Experts before the first
            # have no rows, so the sliced cumulative offsets still start from row 0. Inference
            # only: under autograd the slice's backward would write the weight gradient twice.
            self.active = slice(int(expert_ids[0]), int(expert_ids[-1]) + 1)


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
        weight, offsets, active = self.weight, self.layout.offsets, self.layout.active
        if active is not None:
            weight, offsets = weight[active], offsets[active]
        weight = weight.transpose(-2, -1) if self.weight_layout == "out_in" else weight  # (E, in, out)
        # Under autocast, compute in the autocast dtype as nn.Linear does: grouped_mm is not on
        # autocast's list of ops, so the cast is explicit. Otherwise weights follow the input.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        x = x.to(dtype)
        out = grouped_mm(x, weight.to(dtype), offsets)
        if self.bias is not None:
            out = out + self.bias.to(dtype)[self.layout.expert_ids]
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


def _linear_dims(module: nn.Module) -> tuple[int, int, str]:
    """(in, out, weight layout) of a dense linear layer."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf, "in_out"
    return module.in_features, module.out_features, "out_in"


def dense_linear_layers(mlp: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in mlp.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def make_experts(
    mlp: nn.Module, num_experts: int, hidden_size: int, expert_dropout: float, layout: ExpertLayout, model_type: str
):
    """Turn a dense MLP module in place into E experts; returns the same module object.

    Raises a ValueError naming the backbone when the MLP's linear layers cannot be identified.
    """
    linears = dense_linear_layers(mlp)
    if not linears:
        raise ValueError(
            f"Cannot build experts for model_type {model_type!r}: its feed-forward block {type(mlp).__name__} "
            "has no nn.Linear or Conv1D layer to give an expert dimension"
        )
    output_layers = [name for name, m in linears if _linear_dims(m)[1] == hidden_size]
    if len(output_layers) != 1:
        raise ValueError(
            f"Cannot build experts for model_type {model_type!r}: expected exactly one output projection "
            f"(a linear layer with out_features == hidden_size {hidden_size}) in {type(mlp).__name__}, "
            f"found {output_layers or 'none'}"
        )
    for name, dense in linears:
        in_features, out_features, weight_layout = _linear_dims(dense)
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
    return mlp
