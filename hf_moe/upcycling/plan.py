"""What an upcycling run will need, from the config alone: parameters, disk, conversion memory, training memory.

Nothing here reads a weight. The dense and MoE models are built on the meta device by the same
`plan_conversion` the converter uses, and every figure is arithmetic over their tensor names,
shapes and dtypes, following what `convert`, `streaming`, `verify` and `export` hold in memory.
Memory figures are resident bytes (RSS) above a baseline: the process after its imports, which the
plan measures in the process that makes it (the ``hf-moe upcycle --plan`` process has imported and
built what the conversion imports and builds). Sizes are in bytes; ``format_bytes`` prints them.

    plan = plan_upcycling("Qwen3-0.6B/", num_experts=8, moe_layers="all", verify=True, ep_size=2, fsdp_size=2)
    print(plan.summary())  # what `hf-moe upcycle Qwen3-0.6B/ out --plan ...` prints
"""

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig, PreTrainedConfig

from ..checkpoints.streaming import OutputTensor, assign_shards, header_bytes, tensor_nbytes
from ..checkpoints.units import DTYPES, format_bytes, parse_dtype, parse_size
from ..modeling.experts import GroupedLinear
from ..options import literal, option_error
from .convert import load_dense_config
from .native import export_problems, family_of, tensor_rules
from .settings import CheckpointOptions, PlanOptions, UpcyclingSettings, split_options
from .weights import (
    BACKBONE_PREFIX,
    ConversionPlan,
    check_model_type,
    head_of,
    output_tensors,
    parameter_counts,
    plan_conversion,
)

FLOAT32 = 4  # bytes; the verification and the optimizer states work in float32
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, float32 whatever the parameters' dtype
# Expert init schemes that compute in float32 temporaries: noise holds the float32 weight, the
# noise, the scaled noise and their sum; drop a float32 copy, its replaced rows and their new values.
FLOAT32_TEMPORARIES = {"copy": 0, "noise": 4, "drop": 4}


@dataclass(frozen=True)
class TrainingMemory:
    """Per-rank memory of training the MoE model with AdamW under FSDP2 (+ expert parallelism).

    With transformers' `DistributedConfig(fsdp_size=F, ep_size=P)` (tensor parallelism off), every
    parameter outside the experts is sharded over the F ranks of the FSDP group; the experts are
    split P ways by expert parallelism (E / P experts per rank) and those are FSDP-sharded over the
    ``efsdp = F / P`` ranks holding the same experts. Per rank that is

        sharded = non_expert / F + (expert / P) / (F / P) = (non_expert + expert) / F

    parameters: expert parallelism does not shrink the resident state, it shrinks what FSDP
    all-gathers (a rank gathers only its own experts) and the compute.

        weights     = sharded * bytes(param dtype)
        gradients   = sharded * bytes(param dtype)
        optimizer   = sharded * 2 * 4              (AdamW exp_avg and exp_avg_sq in float32)
        gathered    = (2 * root + 4 * layer) * bytes(param dtype)        (F > 1; 0 without FSDP)

    ``gathered`` is what FSDP2 holds unsharded. The root unit (``root``: the parameters outside the
    decoder layers, i.e. the embedding, a tied or untied head and the final norm) stays gathered
    from its forward until its gradient is reduced, with that full gradient; a decoder layer
    (``layer``: its parameters, the experts counted E / P) is gathered with its full gradient while
    it computes, and the next one is prefetched. The sum is conservative: AdamW allocates its states
    at the first step, once the gathered buffers are freed. Activations are not counted: they depend
    on the batch, the sequence length and activation checkpointing, not on the model alone.
    """

    ep_size: int
    fsdp_size: int
    param_dtype: str
    sharded_parameters: int
    weights: int
    gradients: int
    optimizer: int
    gathered: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered


@dataclass(frozen=True)
class UpcyclingPlan:
    """The figures of one planned conversion; see `plan_upcycling` for how each is computed."""

    total_parameters: int
    active_parameters: int
    expert_parameters: int
    disk_bytes_by_dtype: dict[str, int]  # tensor bytes of the output, per dtype
    weight_file_bytes: int  # the safetensors files: tensors and headers
    shards: int
    conversion_stages: dict[str, int]  # stage -> working set above the baseline
    baseline_bytes: int
    model_comparison: str | None  # why the whole-model verification is skipped; None when it runs (or no verify)
    training: TrainingMemory
    notes: list[str] = field(default_factory=list)

    @property
    def disk_bytes(self) -> int:
        return sum(self.disk_bytes_by_dtype.values())

    @property
    def conversion_peak_bytes(self) -> int:
        """Peak resident memory of the conversion process: baseline + the largest stage."""
        return self.baseline_bytes + max(self.conversion_stages.values())

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "disk_bytes": self.disk_bytes,
            "conversion_peak_bytes": self.conversion_peak_bytes,
            "training_total_bytes": self.training.total,
        }

    def summary(self) -> str:
        share = self.active_parameters / self.total_parameters
        disk = ", ".join(f"{format_bytes(n)} {dtype}" for dtype, n in self.disk_bytes_by_dtype.items())
        lines = [
            f"Parameters: {self.total_parameters:,} total ({self.expert_parameters:,} in experts); "
            f"{self.active_parameters:,} active per token ({share:.0%})",
            f"Output on disk: {format_bytes(self.weight_file_bytes)} in {self.shards} safetensors file(s) ({disk})",
            f"Conversion peak memory (RSS): {format_bytes(self.conversion_peak_bytes)} = "
            f"{format_bytes(self.baseline_bytes)} baseline (imports) + largest stage",
        ]
        lines += [f"  {stage}: {format_bytes(n)}" for stage, n in self.conversion_stages.items()]
        if self.model_comparison is not None:
            lines.append(f"  whole-model verification skipped: {self.model_comparison}")
        t = self.training
        lines += [
            f"Training memory per rank (fsdp_size={t.fsdp_size}, ep_size={t.ep_size}, {t.param_dtype} parameters, "
            f"AdamW; activations not counted): {format_bytes(t.total)}",
            f"  weights {format_bytes(t.weights)} + gradients {format_bytes(t.gradients)} + optimizer states "
            f"{format_bytes(t.optimizer)} ({t.sharded_parameters:,} parameters per rank) + gathered by FSDP "
            f"{format_bytes(t.gathered)}",
        ]
        lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)


def plan_upcycling(
    source: str | os.PathLike | PreTrainedConfig,
    settings: UpcyclingSettings | None = None,
    /,
    *,
    train_dtype: str | torch.dtype = "float32",
    available_memory: int | None = None,
    baseline_bytes: int | None = None,
    **options,
) -> UpcyclingPlan:
    """Plan `upcycle_checkpoint` with the same options, reading only the source's config.

    Args:
        source: a dense checkpoint directory or Hub id (only config.json is read), or its config.
        settings, options: as in `upcycle_checkpoint` (`UpcyclingSettings` and `CheckpointOptions` fields; the
            plan reads ``dtype``, ``max_shard_size``, ``verify``, ``format`` and ``revision``), and the fields
            of `PlanOptions`: ``ep_size``, ``fsdp_size``, the `DistributedConfig` of the training run to plan
            (`TrainingMemory`); ``ep_size`` must divide ``fsdp_size``.
        train_dtype: dtype of the trained parameters and their gradients (``"float32"``: mixed-precision
            training keeps float32 parameters).
        available_memory: free memory the verification sees (default: ``psutil.virtual_memory().available``
            now); it compares whole models only when they fit (see below).
        baseline_bytes: resident memory of the converting process before it converts (default: this
            process' RSS now, which for ``hf-moe upcycle --plan`` is the CLI's own after its imports).

    Parameters (`weights.parameter_counts`): total counts tied tensors once; active per token is
    everything outside the experts (attention, norms, embeddings, routers) plus, per MoE layer, k of the
    E experts for token choice (``num_experts_per_tok``), ``capacity_factor`` of E on average for
    expert choice.

    Disk: every output tensor's bytes in its dtype (the source's dtype from its config, or ``dtype``),
    plus the safetensors headers the writer produces for the same shards (exact); config, code and
    tokenizer files are not counted (kilobytes).

    Conversion memory, per stage, above the baseline:

    - ``write``: tensors are produced one at a time and written chunk by chunk (no shard buffer, no
      mmap): max over tensors of the dense tensor read, its copy in the output dtype when that differs,
      and for ``noise`` / ``drop`` four float32 temporaries of the dense tensor (routers: their float32
      draw and its scaled copy).
    - ``verify layers`` (``verify``): per MoE layer the dense block and the MoE block are built in float32
      from the files: 4 * dense block + 2 * 4 * MoE block (the module and the state dict loaded into
      it) + the largest stacked expert tensor as stored, transiently.
    - ``verify model`` (``verify``): both whole models in float32, 4 * (dense + MoE) parameters, plus
      both checkpoints' bytes (transformers loads them through memory maps, whose pages count as
      resident), only when ``8 * MoE parameters <= available / 2``, the verification's own test.
    - ``export write`` / ``export verify`` (``format="native"``): one expert slice at a time; the
      bit-for-bit check holds a written tensor and its source, 2 * the largest native tensor, and the
      logits check both models in float32 and both checkpoints' bytes, under the same test.

    The peak is the baseline plus the largest stage (they run one after the other).
    """
    scheme, writing, layout = split_options(options, UpcyclingSettings, CheckpointOptions, PlanOptions)
    settings = UpcyclingSettings.from_options(settings, scheme)
    checkpoint = CheckpointOptions(**writing)
    layout = PlanOptions(**{**layout, "plan": True})
    layout.check_experts(settings.num_experts, settings.granularity)
    ep_size, fsdp_size, verify = layout.ep_size, layout.fsdp_size, checkpoint.verify
    param_dtype = _train_dtype(train_dtype)
    target_dtype = parse_dtype(checkpoint.dtype)
    shard_bytes = parse_size(checkpoint.max_shard_size)
    text_config = _dense_config(source, checkpoint.revision)
    head = head_of((text_config.architectures or ["ForCausalLM"])[0])
    plan = plan_conversion(settings.build_config(text_config), head)
    if checkpoint.format == "native":
        problems = export_problems(plan.config, head, flags=True)
        if problems:
            raise ValueError("--format native cannot write these settings natively:\n  - " + "\n  - ".join(problems))
    source_dtype = _source_dtype(text_config)
    meta_dense = dict(plan.meta_dense.state_dict())

    def dtype_of(dense_name: str) -> torch.dtype:
        meta = meta_dense[dense_name].dtype
        return source_dtype if meta.is_floating_point else meta

    outputs = output_tensors(plan, dtype_of, target_dtype)
    total, active = parameter_counts(plan)
    experts = sum(p.numel() for m in plan.meta_moe.modules() if isinstance(m, GroupedLinear) for p in m.parameters())
    by_dtype: dict[str, int] = {}
    for out in outputs:
        name = str(out.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + out.nbytes
    shards = assign_shards(outputs, shard_bytes)
    file_bytes = sum(len(header_bytes(shard)) + sum(t.nbytes for t in shard) for shard in shards)

    available = psutil.virtual_memory().available if available_memory is None else available_memory
    fits = 2 * FLOAT32 * total <= available // 2  # verify.verify_conversion and export._verify decide so
    skipped = None
    if verify and not fits:
        skipped = f"needs about {2 * FLOAT32 * total / 1e9:.1f} GB, {available / 1e9:.1f} GB available"
    stages = {"write": _write_stage(plan, outputs, dtype_of, settings.expert_init)}
    if verify:
        stages["verify layers"] = _verify_layers_stage(plan, outputs)
        if fits:
            dense_params = sum(p.numel() for p in plan.meta_dense.parameters())
            dense_bytes = sum(tensor_nbytes(shape, dtype_of(name)) for name, shape in plan.dense_shapes.items())
            stages["verify model"] = FLOAT32 * (dense_params + total) + dense_bytes + file_bytes
    notes = []
    if checkpoint.format == "native":
        stages.update(_export_stages(plan, outputs, verify and fits, total, verify, file_bytes))
        notes.append(
            "--format native writes the hf_moe checkpoint to a temporary folder first: the disk holds both "
            f"({format_bytes(2 * file_bytes)}) until the export is published"
        )
    return UpcyclingPlan(
        total_parameters=total,
        active_parameters=active,
        expert_parameters=experts,
        disk_bytes_by_dtype=by_dtype,
        weight_file_bytes=file_bytes,
        shards=len(shards),
        conversion_stages=stages,
        baseline_bytes=psutil.Process().memory_info().rss if baseline_bytes is None else baseline_bytes,
        model_comparison=skipped,
        training=training_memory(plan, ep_size, fsdp_size, param_dtype),
        notes=notes,
    )


def training_memory(plan: ConversionPlan, ep_size: int, fsdp_size: int, param_dtype: torch.dtype) -> TrainingMemory:
    """Per-rank weights, gradients, AdamW states and FSDP all-gather buffer; formulas in `TrainingMemory`."""
    model = plan.meta_moe
    total = sum(p.numel() for p in model.parameters())
    sharded = math.ceil(total / fsdp_size)
    size = param_dtype.itemsize
    layers = []  # per decoder layer: its parameters on one EP rank (E / P experts)
    for layer in _decoder_layers(model):
        experts = sum(p.numel() for m in layer.modules() if isinstance(m, GroupedLinear) for p in m.parameters())
        layers.append((sum(p.numel() for p in layer.parameters()), experts))
    root = total - sum(params for params, _ in layers)
    largest_layer = max((params - experts + experts // ep_size for params, experts in layers), default=0)
    gathered = (2 * root + 4 * largest_layer) * size if fsdp_size > 1 else 0
    return TrainingMemory(
        ep_size=ep_size,
        fsdp_size=fsdp_size,
        param_dtype=str(param_dtype).removeprefix("torch."),
        sharded_parameters=sharded,
        weights=sharded * size,
        gradients=sharded * size,
        optimizer=sharded * ADAMW_STATES * FLOAT32,
        gathered=gathered,
    )


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks: the largest ModuleList of the model (``layers`` / ``h``)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _write_stage(plan: ConversionPlan, outputs: list[OutputTensor], dtype_of, expert_init: str) -> int:
    largest = 0
    for t, out in zip(plan.tensors, outputs, strict=True):
        if t.kind in ("copy", "experts", "shared"):
            dense_shape = plan.dense_shapes[t.dense_name]
            source = tensor_nbytes(dense_shape, dtype_of(t.dense_name))
            converted = tensor_nbytes(dense_shape, out.dtype) if out.dtype != dtype_of(t.dense_name) else 0
            temporaries = FLOAT32_TEMPORARIES[expert_init] * tensor_nbytes(dense_shape, torch.float32)
            need = source + converted + (temporaries if t.kind == "experts" else 0)
        elif t.kind == "router":
            need = 2 * tensor_nbytes(out.shape, torch.float32) + out.nbytes
        else:
            need = out.nbytes
        largest = max(largest, need)
    return largest


def _verify_layers_stage(plan: ConversionPlan, outputs: list[OutputTensor]) -> int:
    stored = {out.name: out for out in outputs}
    largest = 0
    for block_name in plan.feed_forward_blocks.values():
        dense = sum(t.numel() for t in plan.meta_dense.get_submodule(block_name).state_dict().values())
        moe_state = plan.meta_moe.get_submodule(BACKBONE_PREFIX + block_name).state_dict()
        moe = sum(t.numel() for t in moe_state.values())
        biggest_read = max(stored[f"{BACKBONE_PREFIX}{block_name}.{name}"].nbytes for name in moe_state)
        largest = max(largest, FLOAT32 * dense + 2 * FLOAT32 * moe + biggest_read)
    return largest


def _export_stages(
    plan: ConversionPlan, outputs: list[OutputTensor], compare: bool, total: int, verify: bool, file_bytes: int
) -> dict[str, int]:
    stored = {out.name: out for out in outputs}
    rules, _ = tensor_rules(family_of(plan.config), plan)
    # A stacked tensor is exported one expert slice at a time.
    largest = max(stored[r.name].nbytes // (len(r.native_names) if r.stacked else 1) for r in rules)
    stages = {"export write": largest}
    if verify:
        stages["export verify"] = 2 * (FLOAT32 * total + file_bytes) if compare else 2 * largest
    return stages


def _train_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"train_dtype must be one of {list(DTYPES)}, got {value!r}")


def _dense_config(source, revision: str | None) -> PreTrainedConfig:
    if isinstance(source, PreTrainedConfig):
        check_model_type(source.model_type, source.to_dict())
        return copy.deepcopy(source)  # the MoE config nests it
    path = Path(source).expanduser()
    if path.is_dir():
        return load_dense_config(path.resolve())
    if path.exists():
        raise option_error(
            FileNotFoundError, "{source=} is a file; pass the checkpoint directory that contains it", source=str(source)
        )
    try:  # a Hub id: only its config.json is fetched
        config = AutoConfig.from_pretrained(str(source), revision=revision)
    except OSError as error:
        raise option_error(
            FileNotFoundError,
            "{source=} is neither a local directory nor a Hub id whose config.json could be fetched: "
            f"{literal(error)}",
            source=str(source),
        ) from None
    check_model_type(config.model_type, config.to_dict())
    return config


def _source_dtype(config: PreTrainedConfig) -> torch.dtype:
    """The dtype the checkpoint stores its floating tensors in, as its config records it (float32 if unset)."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
