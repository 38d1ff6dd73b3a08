"""Model cards: Jinja templates shipped in ``hf_moe/card_templates/``, rendered with strict fields.

`render_model_card` is generic (any template, any fields); the YAML front matter comes from a
`huggingface_hub.ModelCardData` passed as ``card_data`` and the result is parsed back with
`huggingface_hub.ModelCard`, so a card that the Hub would reject fails here.
"""

from importlib import resources

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from .modeling.configuration_moe import HF_MOE_VERSION, MIN_TRANSFORMERS, TESTED_TRANSFORMERS

TEMPLATES = resources.files("hf_moe") / "card_templates"


def read_template(template_name: str) -> str:
    """The text of ``card_templates/<template_name>.md``, read as package data (works from a wheel)."""
    template = TEMPLATES / f"{template_name}.md"
    if not template.is_file():
        available = sorted(t.name.removesuffix(".md") for t in TEMPLATES.iterdir() if t.name.endswith(".md"))
        raise FileNotFoundError(f"No model card template {template_name!r} in {TEMPLATES}; available: {available}")
    return template.read_text(encoding="utf-8")


def render_model_card(template_name: str, **fields) -> str:
    """Render ``card_templates/<template_name>.md``.

    ``card_data`` (a `ModelCardData`) becomes the YAML front matter (``{{ card_data }}`` in the
    template); every other field is a template variable. A variable the template uses but
    ``fields`` lacks is an error, not an empty string. Every template may also use
    ``hf_moe_version``, ``min_transformers`` and ``tested_transformers``: which code a checkpoint
    carries, the oldest transformers release that code runs on and the newest it was tested with.
    """
    card_data = fields.pop("card_data", None) or ModelCardData()
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True
    )
    environment.globals.update(
        hf_moe_version=HF_MOE_VERSION, min_transformers=MIN_TRANSFORMERS, tested_transformers=TESTED_TRANSFORMERS
    )
    template = environment.from_string(read_template(template_name))
    try:
        text = template.render(card_data=card_data.to_yaml(), **fields)
    except jinja2.UndefinedError as error:
        raise ValueError(
            f"Model card template {template_name!r} needs a field that was not given: {error.message}"
        ) from None
    return str(ModelCard(text))


def format_count(count: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(int(count))


def upcycled_model_card(plan, model_name: str) -> str:
    """The card of an upcycled checkpoint (``card_templates/upcycled.md``) from its conversion plan."""
    from .upcycling.weights import head_of, parameter_counts  # the card needs the plan's meta model

    config = plan.config
    upcycling = config.upcycling
    text_config = config.text_config
    is_switch = config.model_type == "switch_moe"
    total, active = parameter_counts(plan)
    if is_switch:
        gates = "renormalised to sum 1" if config.norm_topk_prob else "raw softmax probability (Switch eq. 2)"
        routing = f"token choice, top-{config.num_experts_per_tok} of {config.num_experts}, gates {gates}"
        capacity = f"training capacity factor {config.capacity_factor}, evaluation " + (
            "dropless" if config.eval_capacity_factor is None else f"capacity factor {config.eval_capacity_factor}"
        )
    else:
        inference = config.inference_routing or plan.moe_class.default_inference_routing
        routing = f"expert choice over {config.num_experts} experts, inference routing {inference!r}"
        capacity = (
            f"capacity factor {config.capacity_factor} (each expert takes round(c * seq_len / E) tokens of a sequence)"
        )
    init = {
        "copy": "every expert is a copy of the dense MLP (sparse upcycling, Komatsuzaki et al. 2023)",
        "noise": (
            f"every expert is the dense MLP plus Gaussian noise of {upcycling.get('noise_std')} x "
            "each weight matrix's std"
        ),
        "drop": (
            "Drop-Upcycling (Nakamura et al. 2025): each expert re-initialises a random "
            f"{upcycling.get('drop_ratio')} of its intermediate neurons (the same neurons in every projection) "
            "from the statistics of the replaced weights"
        ),
    }[upcycling["expert_init"]]
    base_model = upcycling["source"] if upcycling.get("revision") else None
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        tags=["moe", "upcycled", config.model_type, "hf_moe"],
        pipeline_tag="text-generation" if plan.moe_class.__name__.endswith("ForCausalLM") else None,
    )
    verification = upcycling.get("verification")
    return render_model_card(
        "upcycled",
        card_data=card_data,
        model_name=model_name,
        source=upcycling["source"],
        revision=upcycling.get("revision"),
        dense_model_type=text_config.model_type,
        model_type=config.model_type,
        model_class=plan.moe_class.__name__,
        auto_class=plan.moe_class.dense_auto_class.__name__,
        num_experts=config.num_experts,
        routing=routing,
        capacity=capacity,
        moe_layers=", ".join(str(i) for i in config.moe_layers),
        num_layers=text_config.num_hidden_layers,
        total_params=format_count(total),
        active_params=format_count(active),
        expert_init=init,
        router_init_std=config.router_init_std,
        seed=upcycling["seed"],
        dtype=upcycling.get("dtype") or "as the source",
        verification=verification,
        tokenizer_remote_code=upcycling.get("tokenizer_remote_code_not_copied"),
        export_status=export_status(config, head_of(plan.moe_class.__name__)),
    )


def export_status(config, head: int) -> str:
    """Whether an hf_moe model can be exported to a native architecture (the upcycled card's line)."""
    from .upcycling.native import FAMILIES_BY_DENSE, export_problems

    problems = export_problems(config, head)
    if problems:
        return "cannot be exported to a native transformers architecture: " + "; ".join(problems)
    family = FAMILIES_BY_DENSE[config.text_config.model_type]
    return (
        f"can be exported exactly to the native `{family.model_type}` architecture "
        f"(`hf-moe export MODEL_DIR OUT_DIR`), served by {', '.join(e.name for e in family.engines)}"
    )


def serving_limits(config, family, native) -> list[str]:
    """What the engines do differently for these settings, and what the export leaves behind."""
    limits = []
    raw_gates = family.norm_topk_prob_field is not None and not config.norm_topk_prob
    engines = {engine.name for engine in family.engines}
    if family.model_type == "qwen3_moe" and raw_gates:
        limits.append(
            "llama.cpp always renormalises qwen3moe top-k gates: this raw-gate model (norm_topk_prob=False) "
            "computes a different function there and gives other tokens, without a warning"
        )
    dense_layers = getattr(native, family.dense_layers_field, None) if family.dense_layers_field else None
    if dense_layers and "llama.cpp" in engines:
        limits.append(
            f"llama.cpp cannot load dense/MoE layer mixes: layers {dense_layers} are dense "
            "(upcycle with --moe-layers all for a llama.cpp-compatible model)"
        )
    if family.zero_tensors:
        limits.append(
            "the shared expert has size 0 (shared_expert_intermediate_size=0) so that it adds exactly nothing; "
            "its empty tensors are not stored, so transformers reports them as newly initialised (they hold no "
            "values)"
        )
    dropped = [
        f"{name}={getattr(config, name)}"
        for name in ("router_z_loss_coef", "expert_dropout", "capacity_factor", "router_jitter_noise")
        if getattr(config, name, None) and name not in family.carried_fields
    ]
    if dropped:
        limits.append(
            f"training-only hf_moe settings have no native field and are not carried over ({', '.join(dropped)}); "
            "native training is dropless. To fine-tune with them, `hf-moe import` this checkpoint"
        )
    limits.append(
        "native routers compute their logits in the weights' dtype, hf_moe in float32: in bfloat16 or float16 "
        "a near-tie between experts may be broken differently"
    )
    return limits


def exported_model_card(config, family, native, model_name: str, origin: dict) -> str:
    """The card of an exported native checkpoint (``card_templates/exported.md``)."""
    upcycling = getattr(config, "upcycling", None) or {}
    head_class = native.architectures[0]
    card_data = ModelCardData(
        base_model=origin["source"] if origin.get("revision") else None,
        library_name="transformers",
        tags=["moe", family.model_type, "hf_moe"] + (["upcycled"] if upcycling else []),
        pipeline_tag="text-generation" if head_class.endswith("ForCausalLM") else None,
    )
    gates = "renormalised to sum 1" if config.norm_topk_prob else "raw softmax probabilities"
    dense_layers = getattr(native, family.dense_layers_field) if family.dense_layers_field else []
    return render_model_card(
        "exported",
        card_data=card_data,
        model_name=model_name,
        source=origin["source"],
        revision=origin.get("revision"),
        upcycled_from=upcycling.get("source"),
        dense_model_type=config.text_config.model_type,
        native_model_type=family.model_type,
        native_class=head_class,
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        gates=gates,
        moe_layers=", ".join(str(i) for i in config.moe_layers),
        dense_layers=", ".join(str(i) for i in dense_layers) or "none",
        engines=family.engines,
        limits=serving_limits(config, family, native),
        verification=getattr(native, "hf_moe_export", {}).get("verification"),
    )


def imported_model_card(config, family, plan, model_name: str) -> str:
    """The card of a native MoE checkpoint imported into hf_moe (``card_templates/imported.md``)."""
    imported = config.imported
    card_data = ModelCardData(
        base_model=imported["source"] if imported.get("revision") else None,
        library_name="transformers",
        tags=["moe", config.model_type, "hf_moe"],
        pipeline_tag="text-generation" if plan.moe_class.__name__.endswith("ForCausalLM") else None,
    )
    return render_model_card(
        "imported",
        card_data=card_data,
        model_name=model_name,
        source=imported["source"],
        revision=imported.get("revision"),
        native_model_type=family.model_type,
        dense_model_type=config.text_config.model_type,
        model_class=plan.moe_class.__name__,
        auto_class=plan.moe_class.dense_auto_class.__name__,
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        norm_topk_prob=config.norm_topk_prob,
        moe_layers=", ".join(str(i) for i in config.moe_layers),
        num_layers=config.text_config.num_hidden_layers,
        verification=imported.get("verification"),
    )
