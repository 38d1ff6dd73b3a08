"""Model cards: Jinja templates in ``model_cards/`` (installed as ``hf_moe.card_templates``), rendered with
strict fields.

`render_model_card` is generic (any template, any fields); the YAML front matter comes from a
`huggingface_hub.ModelCardData` passed as ``card_data`` and the result is parsed back with
`huggingface_hub.ModelCard`, so a card that the Hub would reject fails here.
"""

from importlib import resources

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from .modeling.configuration_moe import HF_MOE_VERSION, MIN_TRANSFORMERS, TESTED_TRANSFORMERS
from .modeling.registry import routing_method_of

TEMPLATES = resources.files("hf_moe.card_templates")


def read_template(template_name: str) -> str:
    """The text of ``model_cards/<template_name>.md``, read as package data (works from a wheel)."""
    template = TEMPLATES / f"{template_name}.md"
    if not template.is_file():
        available = sorted(t.name.removesuffix(".md") for t in TEMPLATES.iterdir() if t.name.endswith(".md"))
        raise FileNotFoundError(f"No model card template {template_name!r} in {TEMPLATES}; available: {available}")
    return template.read_text(encoding="utf-8")


def render_model_card(template_name: str, **fields) -> str:
    """Render ``model_cards/<template_name>.md``.

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


def upcycled_model_card(
    config, model_class: type, model_name: str, total_params: int, active_params: int, export_status: str
) -> str:
    """The card of an upcycled checkpoint (``model_cards/upcycled.md``): its MoE ``config`` (with
    the ``upcycling`` record), the class it loads as, its parameter counts (total, active per token)
    and whether it can be exported (`hf_moe.upcycling.native.export_status`)."""
    upcycling = config.upcycling
    text_config = config.text_config
    routing, capacity = routing_method_of(config).card_summary(config, model_class)
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
    num_experts = config.num_experts
    granularity = upcycling.get("granularity", 1)
    if granularity > 1:
        groups, width = config.num_experts // granularity, config.moe_intermediate_size
        num_experts = f"{config.num_experts} of width {width} ({groups} virtual groups x {granularity} shards)"
        init = (
            f"fine-grained upcycling (He et al. 2024, arXiv 2410.07524) with granularity {granularity}: expert "
            f"e * {granularity} + g holds shard g of the dense MLP's intermediate neurons (width {width}), its output "
            f"projection scaled by {granularity}; the {granularity} experts of a virtual group share one router row, "
            "so top-k selects whole groups and renormalised gates give the dense function; "
            + init.replace("the dense MLP", "its shard of the dense MLP")
        )
    if getattr(config, "shared_expert_intermediate_size", None):
        init += "; " + shared_expert_summary(config, upcycling.get("shared_expert") or {})
    base_model = upcycling["source"] if upcycling.get("revision") else None
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        tags=["moe", "upcycled", config.model_type, "hf_moe"],
        pipeline_tag="text-generation" if model_class.__name__.endswith("ForCausalLM") else None,
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
        model_class=model_class.__name__,
        auto_class=model_class.dense_auto_class.__name__,
        num_experts=num_experts,
        routing=routing,
        capacity=capacity,
        moe_layers=", ".join(str(i) for i in config.moe_layers),
        num_layers=text_config.num_hidden_layers,
        total_params=format_count(total_params),
        active_params=format_count(active_params),
        expert_init=init,
        router_init_std=config.router_init_std,
        seed=upcycling["seed"],
        dtype=upcycling.get("dtype") or "as the source",
        verification=verification,
        tokenizer_remote_code=upcycling.get("tokenizer_remote_code_not_copied"),
        export_status=export_status,
    )


def shared_expert_summary(config, scheme: dict) -> str:
    """The card's phrase for an upcycled shared expert (``scheme``: the ``shared_expert`` upcycling record)."""
    size = config.shared_expert_intermediate_size
    held = "the whole dense MLP" if scheme.get("size") is None else f"the dense MLP's first {size} intermediate neurons"
    gate = (
        ", scaled per token by sigmoid(w.x) as in Qwen2-MoE (w = 0 and its output projection doubled at step 0)"
        if config.shared_expert_gate
        else ""
    )
    routed = (
        "the routed experts' output projections start at zero, so they add nothing until trained and the step-0 "
        "model computes the dense function whatever the routing and expert init"
        if scheme.get("size") is None
        else "the routed experts' output projections start at zero on those neurons and carry the rest of the MLP, "
        "so with copied experts and gates summing to 1 the step-0 model computes the dense function"
    )
    return f"an always-on shared expert (DeepSeekMoE, Dai et al. 2024; Qwen2-MoE) holds {held}{gate}; {routed}"


def gate_phrase(config) -> str:
    """How a token-choice model's top-k gates are computed, for the export and import cards."""
    scores = f"{getattr(config, 'scoring_func', 'softmax')} scores"
    return f"{scores} renormalised to sum 1" if config.norm_topk_prob else f"raw {scores}"


def exported_model_card(config, family, native, model_name: str, origin: dict, limits: list[str]) -> str:
    """The card of an exported native checkpoint (``model_cards/exported.md``): the hf_moe
    ``config`` it came from, its native family (`hf_moe.upcycling.native.NativeFamily`) and
    ``native`` config, and what the engines compute differently (``limits``, from
    `hf_moe.upcycling.native.serving_limits`)."""
    upcycling = getattr(config, "upcycling", None) or {}
    head_class = native.architectures[0]
    card_data = ModelCardData(
        base_model=origin["source"] if origin.get("revision") else None,
        library_name="transformers",
        tags=["moe", family.model_type, "hf_moe"] + (["upcycled"] if upcycling else []),
        pipeline_tag="text-generation" if head_class.endswith("ForCausalLM") else None,
    )
    gates = gate_phrase(config)
    dense_layers = family.dense_layers(native)
    return render_model_card(
        "exported",
        card_data=card_data,
        model_name=model_name,
        source=origin["source"],
        revision=origin.get("revision"),
        upcycled_from=upcycling.get("source"),
        dense_model_type=config.text_config.model_type,
        native_model_type=family.model_type,
        hf_moe_model_type=config.model_type,
        native_class=head_class,
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        gates=gates,
        moe_layers=", ".join(str(i) for i in config.moe_layers),
        dense_layers=", ".join(str(i) for i in dense_layers) or "none",
        engines=family.engines,
        limits=limits,
        verification=getattr(native, "hf_moe_export", {}).get("verification"),
    )


def imported_model_card(config, family, model_class: type, model_name: str) -> str:
    """The card of a native MoE checkpoint imported into hf_moe (``model_cards/imported.md``):
    its hf_moe ``config`` (with the ``imported`` record), the native family it came from and the
    class it loads as."""
    imported = config.imported
    card_data = ModelCardData(
        base_model=imported["source"] if imported.get("revision") else None,
        library_name="transformers",
        tags=["moe", config.model_type, "hf_moe"],
        pipeline_tag="text-generation" if model_class.__name__.endswith("ForCausalLM") else None,
    )
    return render_model_card(
        "imported",
        card_data=card_data,
        model_name=model_name,
        source=imported["source"],
        revision=imported.get("revision"),
        native_model_type=family.model_type,
        dense_model_type=config.text_config.model_type,
        model_class=model_class.__name__,
        auto_class=model_class.dense_auto_class.__name__,
        hf_moe_model_type=config.model_type,
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        gates=gate_phrase(config),
        moe_layers=", ".join(str(i) for i in config.moe_layers),
        num_layers=config.text_config.num_hidden_layers,
        verification=imported.get("verification"),
    )
