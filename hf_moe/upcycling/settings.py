"""The one schema of the upcycling options: names, types, defaults, help text and validation.

`UpcyclingSettings` (what to build: `UpcyclingScheme` plus `RoutingOptions`), `CheckpointOptions`
(how a checkpoint conversion reads and writes) and `PlanOptions` (``--plan``) are the options of
`upcycle_model`, `upcycle_checkpoint`, `plan_upcycling`, of ``hf-moe upcycle`` (its parser and
``--help`` are generated from these dataclasses) and of the recipes (`MoeArguments`). Every problem
names its option through `hf_moe.options`, so each caller reports it in its own spelling.

Routing fields are fields of the MoE configuration classes and are validated there
(`SwitchMoeConfig`, `ExpertChoiceMoeConfig`); unset (None) they take the routing's default.
"""

import dataclasses
import math
import typing
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import AutoModel, LlamaConfig, PreTrainedConfig

from ..checkpoints.units import DTYPES, parse_dtype, parse_size
from ..modeling import find_feed_forward_blocks
from ..modeling.experts import mlp_intermediate_size
from ..modeling.registry import ROUTING_CONFIGS
from ..options import OptionsError, literal, option_error

ROUTINGS = ROUTING_CONFIGS  # routing name -> config class, read from the registry at each access
ExpertInit = Literal["copy", "noise", "drop"]
EXPERT_INITS = typing.get_args(ExpertInit)
Format = Literal["hf_moe", "native"]
FORMATS = typing.get_args(Format)
MOE_LAYER_SHORTHANDS = ("every_other", "all", "last_half")
DROPLESS = "dropless"  # a capacity factor without a limit (None on the MoE config)
DEFAULT_NOISE_STD = 0.01
# Token-choice defaults of an upcycled model: renormalised top-2 computes the dense function at step 0
# (copied experts, gates summing to 1) and its router learns from the task loss, whereas the single
# renormalised gate of top-1 is always exactly 1 and passes the router no gradient (measured router
# gradient norm from the task loss after copy upcycling: top-1 ~1e-9, top-2 ~2e-3; README, Upcycling).
# Top-2 is also what sparse upcycling uses for decoders (Komatsuzaki et al. 2023, §3.1).
UPCYCLING_TOP_K = 2
UPCYCLING_NORM_TOPK_PROB = True
UPCYCLING_DEFAULTS = {"num_experts_per_tok": UPCYCLING_TOP_K, "norm_topk_prob": UPCYCLING_NORM_TOPK_PROB}


def is_finite_number(value) -> bool:
    """An int or float that is neither nan nor infinite (nan passes every ``< 0`` check)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class UpcyclingWarning(UserWarning):
    """Settings that convert, but that a user most likely does not want."""


# Set by the converter itself, not by overrides.
_RESERVED_FIELDS = {"text_config", "num_experts", "moe_layers", "tie_word_embeddings"}


def config_fields(config_class) -> list[str]:
    """The MoE settings a run may set for one routing (the config's own dataclass fields)."""
    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    return [f.name for f in dataclasses.fields(config_class) if f.name not in base | _RESERVED_FIELDS]


def _help(text: str, **metadata) -> dict:
    return {"help": text, **metadata}


def _got(value) -> str:
    """The given value at the end of a problem: ``got 12`` in every spelling."""
    return literal(repr(value))


def _problem(error: BaseException) -> tuple[str, dict]:
    """The ``(template, values)`` of an error raised through `hf_moe.options.option_error`."""
    return getattr(error, "option_message", (literal(error), {}))


@dataclass
class RoutingOptions:
    """Fields of the MoE config (`SwitchMoeConfig` / `ExpertChoiceMoeConfig`). Unset (None), an upcycled model
    takes the routing's default (`routing_defaults`) and a fine-tuned hf_moe checkpoint keeps its own value."""

    num_experts_per_tok: int | None = field(
        default=None,
        metadata=_help(
            "switch: experts per token, k of top-k. Upcycling sets it to 2 unless given: with renormalised gates the "
            "model computes the dense function at step 0 and the routers learn from the task loss; renormalised "
            "top-1 gives the routers no task-loss gradient and warns"
        ),
    )
    norm_topk_prob: bool | None = field(
        default=None,
        metadata=_help(
            "switch: renormalise the top-k gates to sum 1 (upcycling sets it to true unless given, which preserves "
            "the dense function); false keeps Switch's raw gate (the router learns, but step 0 is not exact)"
        ),
    )
    capacity_factor: float | str | None = field(
        default=None,
        metadata=_help(
            f"training capacity factor, a number > 0; switch: '{DROPLESS}' for no limit; expert_choice: c, tokens "
            "per expert = c*seq_len/E"
        ),
    )
    eval_capacity_factor: float | str | None = field(
        default=None,
        metadata=_help(f"switch: evaluation/generation capacity factor, a number > 0 or '{DROPLESS}'"),
    )
    router_jitter_noise: float | None = field(
        default=None, metadata=_help("switch: multiplicative router-input jitter epsilon, training only")
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata=_help(
            "switch: load-balancing loss coefficient; aux_free: sequence-wise balance loss coefficient (DeepSeek-V3)"
        ),
    )
    router_z_loss_coef: float | None = field(default=None, metadata=_help("router z-loss coefficient"))
    expert_dropout: float | None = field(
        default=None,
        metadata=_help("dropout on the experts' hidden activation, training only (Switch fine-tuning uses 0.4)"),
    )
    router_init_std: float | None = field(default=None, metadata=_help("std of the routers' normal initialisation"))
    inference_routing: str | None = field(
        default=None,
        metadata=_help(
            "expert_choice: 'threshold' (causal) or 'expert_choice'; None picks threshold for causal LM and "
            "expert_choice for the base model and classifiers"
        ),
    )
    threshold_ema_decay: float | None = field(
        default=None, metadata=_help("expert_choice: decay of the running score thresholds")
    )
    balance_scope: str | None = field(
        default=None,
        metadata=_help(
            "switch: tokens the balancing loss counts over, 'micro_batch' (this process) or 'global_batch' "
            "(every data-parallel process; Qiu et al. 2025)"
        ),
    )
    scoring_func: str | None = field(
        default=None,
        metadata=_help("aux_free: router scores, 'sigmoid' (DeepSeek-V3) or 'softmax'"),
    )
    bias_update_rate: float | None = field(
        default=None,
        metadata=_help(
            "aux_free: gamma of the selection-bias update b_i += gamma * sign(mean load - load_i) after each "
            "optimizer step (Wang et al. 2024)"
        ),
    )

    def routing_values(self) -> dict:
        """The routing fields that are set, as the MoE config takes them (``"dropless"`` -> None)."""
        values = {}
        for option in dataclasses.fields(RoutingOptions):
            value = getattr(self, option.name)
            if value is not None:
                values[option.name] = None if value == DROPLESS else value
        return values

    def _normalise_routing(self) -> list[tuple[str, dict]]:
        """Capacity factors from text (``"1.5"`` -> 1.5), and the problems no routing is needed to judge."""
        problems = []
        for name in ("capacity_factor", "eval_capacity_factor"):
            given = value = getattr(self, name)
            if isinstance(value, str) and value != DROPLESS:
                try:
                    value = float(value)
                except ValueError:
                    pass
            if value is None or value == DROPLESS:
                continue
            if is_finite_number(value) and value > 0:
                setattr(self, name, value)
            else:
                problems.append(
                    (
                        f"{{{name}}} must be a finite number > 0 or '{DROPLESS}' (no limit), got {_got(given)}",
                        {name: value},
                    )
                )
        for option in dataclasses.fields(RoutingOptions):
            value = getattr(self, option.name)
            if option.name.endswith("capacity_factor") or value is None:
                continue
            if option.name == "norm_topk_prob" and not isinstance(value, bool):
                problems.append((f"{{norm_topk_prob}} must be true or false, got {_got(value)}", {}))
            elif isinstance(value, float) and not math.isfinite(value):  # nan passes every range check
                problems.append((f"{{{option.name}}} must be a finite number, got {_got(value)}", {}))
        return problems

    def routing_problems(self, routing: str | None = None, num_experts: int | None = None) -> list[tuple[str, dict]]:
        """Problems of the routing fields, judged by the MoE config class of ``routing``; without one (a
        checkpoint whose routing is known only when it loads), a value every routing having the field rejects."""
        problems = self._normalise_routing()
        judged = {name for name in self.routing_values() if not any(p[0].startswith(f"{{{name}}}") for p in problems)}
        values = {name: value for name, value in self.routing_values().items() if name in judged}
        if routing is not None:
            allowed = [
                n for n in config_fields(ROUTINGS[routing]) if n in {f.name for f in dataclasses.fields(RoutingOptions)}
            ]
            for name in values:
                if name not in allowed:
                    listing = ", ".join(f"{{{n}}}" for n in allowed)
                    problems.append(
                        (
                            f"{{{name}}} is not a setting of {{routing=}} ({ROUTINGS[routing].__name__}); "
                            f"its settings: {listing}",
                            {"routing": routing},
                        )
                    )
            own = {name: value for name, value in values.items() if name in allowed}
            return problems + config_problems(ROUTINGS[routing], own, num_experts)
        by_field: dict[str, list] = {}
        for config_class in ROUTINGS.values():
            own = {n: v for n, v in values.items() if n in config_fields(config_class)}
            rejected = config_problems(config_class, own, num_experts)
            for name in own:
                by_field.setdefault(name, []).append([p for p in rejected if p[0].startswith(f"{{{name}}} ")])
        for verdicts in by_field.values():
            if all(verdicts):
                problems += verdicts[0]
        return problems


def takes_top_k(config_class) -> bool:
    """Whether a routing picks each token's top-k experts (Switch, and any registered token-choice routing with
    ``num_experts_per_tok`` and ``norm_topk_prob``): upcycling then defaults to renormalised top-2."""
    return set(UPCYCLING_DEFAULTS) <= set(config_fields(config_class))


def routing_defaults(name: str) -> str:
    """What an unset routing field becomes, read from the config classes: ``"switch 1.25, expert_choice 2.0"``."""
    found = []
    for routing, config_class in ROUTINGS.items():
        default = next((f.default for f in dataclasses.fields(config_class) if f.name == name), dataclasses.MISSING)
        if default is dataclasses.MISSING:
            continue
        if name in UPCYCLING_DEFAULTS and takes_top_k(config_class):
            default = f"{UPCYCLING_DEFAULTS[name]} when upcycling, else {default}"
        elif default is None and name.endswith("capacity_factor"):
            default = DROPLESS
        found.append(f"{routing} {default}")
    return ", ".join(found)


def _probe_text_config() -> PreTrainedConfig:
    """A decoder config to judge routing fields on before the real one is read (only its layer count matters)."""
    return LlamaConfig(num_hidden_layers=2, hidden_size=8, intermediate_size=8, num_attention_heads=1, vocab_size=8)


def dense_intermediate_size(text_config: PreTrainedConfig) -> int:
    """The intermediate width I of the dense MLP ``text_config`` describes, read off a meta-device model
    (``intermediate_size``, GPT-2's ``n_inner`` or ``4 * n_embd``, a fused gate/up projection: one rule)."""
    with torch.device("meta"):
        dense = AutoModel.from_config(text_config)
    try:
        block = next(iter(find_feed_forward_blocks(dense, text_config).values()))
    except ValueError as error:
        raise ValueError(f"granularity needs the dense MLP's intermediate size: {error}") from None
    width = mlp_intermediate_size(dense.get_submodule(block), text_config.hidden_size)
    if width is None:
        raise ValueError(
            f"granularity needs the dense MLP's intermediate size, but {block} of model_type "
            f"{text_config.model_type!r} has no single output projection"
        )
    return width


def build_moe_config(config_class, text_config, num_experts, moe_layers, values: dict) -> PreTrainedConfig:
    """``config_class`` around ``text_config``; its problems come out as an `OptionsError` naming each field."""
    try:
        return config_class(text_config=text_config, num_experts=num_experts, moe_layers=moe_layers, **values)
    except ValueError as error:
        names = [*values, "num_experts", "moe_layers"]
        raise OptionsError(config_lines(error, names), "Invalid upcycling settings") from None


def config_problems(config_class, values: dict, num_experts: int | None = None) -> list[tuple[str, dict]]:
    """The problems ``config_class`` finds in the routing ``values`` (``[]`` when it accepts them). Without
    ``num_experts`` (a checkpoint's, known when it loads) enough experts for any ``num_experts_per_tok``."""
    if num_experts is None:
        k = values.get("num_experts_per_tok")
        num_experts = k if isinstance(k, int) and not isinstance(k, bool) and k >= 1 else 1
    try:
        build_moe_config(config_class, _probe_text_config(), num_experts, "all", values)
    except OptionsError as error:
        return error.problems
    return []


def config_lines(error: ValueError, names) -> list[tuple[str, dict]]:
    """A config class's ``Invalid ...:\\n  - <field> must ...`` problems, each naming its field (longest name first,
    so ``num_experts_per_tok`` is not read as ``num_experts``)."""
    problems = []
    for line in str(error).split("\n  - ")[1:] or [str(error)]:
        name = next((n for n in sorted(names, key=len, reverse=True) if line.startswith(f"{n} ")), None)
        problems.append((f"{{{name}}} {literal(line[len(name) + 1 :])}", {}) if name else (literal(line), {}))
    return problems


@dataclass
class UpcyclingScheme:
    """What to build from the dense model: the routing, the experts, the MoE layers and how the experts start."""

    routing: str = field(
        default="switch",
        metadata=_help(
            "switch: token choice (top-k, SwitchMoeConfig); expert_choice: each expert picks its tokens "
            "(ExpertChoiceMoeConfig)"
        ),
    )
    num_experts: int = field(default=8, metadata=_help("experts per MoE layer"))
    moe_layers: str | list[int] = field(
        default="every_other",
        metadata=_help(
            "layers that become MoE: every_other (odd layers), all, last_half, or layer indices "
            "(0,2,5 on the command line, a list in Python and YAML)"
        ),
    )
    expert_init: ExpertInit = field(
        default="copy",
        metadata=_help(
            "copy: every expert the dense MLP (Komatsuzaki et al. 2023); noise: copy plus "
            "N(0, (noise_std * std(W))^2) on every expert weight matrix; drop: Drop-Upcycling (Nakamura et al. 2025), "
            "per expert a random fraction drop_ratio of the intermediate neurons re-initialised"
        ),
    )
    noise_std: float = field(
        default=DEFAULT_NOISE_STD,
        metadata=_help("expert_init noise: noise std relative to each weight matrix's std"),
    )
    drop_ratio: float = field(
        default=0.5, metadata=_help("expert_init drop: fraction of intermediate neurons re-initialised per expert")
    )
    seed: int = field(
        default=0, metadata=_help("seed of the routers, the noise and the dropped neurons (same seed, same tensors)")
    )
    shared_expert: bool = field(
        default=False,
        metadata=_help(
            "keep the first shared_expert_size neurons of each dense FFN as an always-on shared expert beside the "
            "routed ones (DeepSeekMoE, Dai et al. 2024; Qwen2-MoE); the routed experts' output projections start "
            "at zero for those neurons, so the step-0 function is the dense one (README, Upcycling)"
        ),
    )
    shared_expert_size: int | None = field(
        default=None,
        metadata=_help(
            "shared_expert: how many of the dense FFN's intermediate neurons the shared expert keeps (unset: all of "
            "them; the routed experts then start with a zero contribution, exact with any routing and init)"
        ),
    )
    shared_expert_gate: bool = field(
        default=False,
        metadata=_help(
            "shared_expert: scale the shared expert per token by sigmoid(w.x) as Qwen2-MoE does; w starts at 0 and "
            "the shared output projection at twice the dense one, so 0.5 * 2 keeps the dense function exactly"
        ),
    )
    granularity: int = field(
        default=1,
        metadata=_help(
            "fine-grained upcycling (He et al. 2024, arXiv 2410.07524): split each MLP into G shards of its "
            "intermediate size, making num_experts * G experts of width I/G routed top-(num_experts_per_tok * G); "
            "G must divide I. Virtual-group initialisation keeps the dense function at step 0 (switch routing only)"
        ),
    )

    def _scheme_problems(self) -> list[tuple[str, dict]]:
        problems = []
        if isinstance(self.moe_layers, tuple):
            self.moe_layers = list(self.moe_layers)
        if isinstance(self.moe_layers, str) and self.moe_layers not in MOE_LAYER_SHORTHANDS:
            try:
                self.moe_layers = [int(part) for part in self.moe_layers.split(",")]
            except ValueError:
                problems.append(
                    (
                        f"{{moe_layers}} must be one of {list(MOE_LAYER_SHORTHANDS)} or layer indices such as "
                        f"0,2,5, got {_got(self.moe_layers)}",
                        {},
                    )
                )
        elif (
            not isinstance(self.moe_layers, (str, list))
            or isinstance(self.moe_layers, list)
            and not all(isinstance(i, int) and not isinstance(i, bool) for i in self.moe_layers)
        ):
            problems.append(
                (
                    f"{{moe_layers}} must be one of {list(MOE_LAYER_SHORTHANDS)} or a list of layer indices, "
                    f"got {_got(self.moe_layers)}",
                    {},
                )
            )
        if self.routing not in ROUTINGS:
            problems.append((f"{{routing}} must be one of {list(ROUTINGS)}, got {_got(self.routing)}", {}))
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
            problems.append((f"{{num_experts}} must be an integer >= 1, got {_got(self.num_experts)}", {}))
        if self.expert_init not in EXPERT_INITS:
            problems.append(
                (
                    f"{{expert_init}} must be one of {list(EXPERT_INITS)}, got {_got(self.expert_init)}",
                    {},
                )
            )
        if not is_finite_number(self.noise_std) or self.noise_std < 0:
            problems.append((f"{{noise_std}} must be a finite number >= 0, got {_got(self.noise_std)}", {}))
        if not is_finite_number(self.drop_ratio) or not 0 <= self.drop_ratio <= 1:
            problems.append((f"{{drop_ratio}} must be a finite number in [0, 1], got {_got(self.drop_ratio)}", {}))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.append((f"{{seed}} must be an integer >= 0, got {_got(self.seed)}", {}))
        problems += self._shared_expert_problems()
        if isinstance(self.granularity, bool) or not isinstance(self.granularity, int) or self.granularity < 1:
            problems.append((f"{{granularity}} must be an integer >= 1, got {_got(self.granularity)}", {}))
        elif self.granularity > 1 and self.routing in ROUTINGS and not takes_top_k(ROUTINGS[self.routing]):
            problems.append(
                (
                    "{granularity} needs top-k token choice (virtual groups select whole groups of shards), "
                    "which {routing=} does not route by; use {routing=switch}, got {granularity=}",
                    {"routing": self.routing, "granularity": self.granularity},
                )
            )
        if self.shared_expert and isinstance(self.granularity, int) and self.granularity > 1:
            problems.append(
                (
                    "{shared_expert} and {granularity} > 1 do not combine yet (the shared expert's split keeps "
                    "full-width routed experts); choose one, got {granularity=}",
                    {"granularity": self.granularity},
                )
            )
        defaults = {f.name: f.default for f in dataclasses.fields(UpcyclingScheme)}
        for name, scheme in (("noise_std", "noise"), ("drop_ratio", "drop")):
            if (
                getattr(self, name) != defaults[name]
                and self.expert_init != scheme
                and self.expert_init in EXPERT_INITS
            ):
                problems.append(
                    (
                        f"{{{name}}} applies to {{expert_init={scheme}}} only, got {{expert_init=}}",
                        {"expert_init": self.expert_init},
                    )
                )
        return problems

    def _shared_expert_problems(self) -> list[tuple[str, dict]]:
        problems = []
        for name in ("shared_expert", "shared_expert_gate"):
            if not isinstance(getattr(self, name), bool):
                problems.append((f"{{{name}}} must be true or false, got {_got(getattr(self, name))}", {}))
        size = self.shared_expert_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            problems.append(
                (f"{{shared_expert_size}} must be an integer >= 1 (unset: the whole FFN), got {_got(size)}", {})
            )
        if self.shared_expert is not True:
            for name, default in (("shared_expert_size", None), ("shared_expert_gate", False)):
                if getattr(self, name) not in (default, None):
                    problems.append(
                        (
                            f"{{{name}}} applies with {{shared_expert}} only, got {{{name}=}}",
                            {name: getattr(self, name)},
                        )
                    )
        return problems

    def shared_expert_width(self, text_config: PreTrainedConfig) -> int | None:
        """Neurons of the shared expert for ``text_config`` (None without one); an `OptionsError` when
        ``shared_expert_size`` exceeds the dense FFN's."""
        if not self.shared_expert:
            return None
        width = dense_ffn_width(text_config)
        size = self.shared_expert_size or width
        if width is not None and size > width:
            raise OptionsError(
                [
                    (
                        f"{{shared_expert_size}} must be at most the dense FFN's intermediate size ({width}), "
                        "got {shared_expert_size=}",
                        {"shared_expert_size": size},
                    )
                ],
                "Invalid upcycling settings",
            )
        return size


def dense_ffn_width(text_config: PreTrainedConfig) -> int | None:
    """The dense FFN's intermediate size: ``intermediate_size``, or GPT-2's ``n_inner`` (4 x hidden when unset).
    The converter checks it against the dense model's own modules."""
    width = getattr(text_config, "intermediate_size", None)
    if width is None and getattr(text_config, "model_type", None) == "gpt2":
        width = text_config.n_inner or 4 * text_config.n_embd
    return width


@dataclass
class UpcyclingSettings(RoutingOptions, UpcyclingScheme):
    """Options of one dense -> MoE conversion: the scheme (`UpcyclingScheme`) and the MoE config fields
    (`RoutingOptions`). Validated on construction; every problem is reported at once (`OptionsError`).

    For token choice ``num_experts_per_tok`` defaults to 2 and ``norm_topk_prob`` to True here (unlike
    the config's 1 and False): the upcycled model starts out computing the dense function and its routers
    learn from the task loss. Top-1 with renormalised gates is accepted with a warning: its gate is
    always 1, so the routers learn only from the router losses.
    """

    def __post_init__(self):
        problems = self._scheme_problems()
        # A bad routing or number of experts: the routing fields are still judged, by every routing.
        routing = self.routing if self.routing in ROUTINGS else None
        num_experts = self.num_experts if not any(p[0].startswith("{num_experts}") for p in problems) else None
        problems += self.routing_problems(routing, num_experts)
        if problems:
            raise OptionsError(problems, "Invalid upcycling settings")

    @classmethod
    def from_options(cls, settings: "UpcyclingSettings | None", options: dict) -> "UpcyclingSettings":
        """``settings``, or the settings of keyword ``options`` (the API's two ways to say the same)."""
        if settings is not None:
            if not isinstance(settings, UpcyclingSettings):
                raise TypeError(f"settings must be an UpcyclingSettings, got {type(settings).__name__}")
            if options:
                raise TypeError(f"give settings or keyword options, not both; got settings and {sorted(options)}")
            return settings
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown upcycling options {unknown}; the options are {sorted(known)}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            # The MoE config stores no limit as None, and this API once took None for it: refuse None rather than
            # read it as "unset" (the routing's default, which for capacity_factor is a limit).
            if name in options and options[name] is None:
                raise ValueError(
                    f"{name}=None is ambiguous: no capacity limit is {name}={DROPLESS!r}; leave {name} out for the "
                    "routing's default"
                )
        return cls(**options)

    def build_config(self, text_config: PreTrainedConfig, upcycling: dict | None = None) -> PreTrainedConfig:
        """The MoE config around ``text_config``; the config class validates the routing settings."""
        overrides = self.routing_values()
        if takes_top_k(ROUTINGS[self.routing]):
            overrides.setdefault("norm_topk_prob", UPCYCLING_NORM_TOPK_PROB)
            overrides.setdefault("num_experts_per_tok", min(UPCYCLING_TOP_K, self.num_experts))  # 1 expert: top-1
        num_experts = self.num_experts
        if self.granularity > 1:
            # E virtual groups of G shards each: E * G experts of width I / G, top-(k * G) (`granular_experts`).
            overrides["moe_intermediate_size"] = self.expert_intermediate_size(text_config)
            overrides["num_experts_per_tok"] *= self.granularity
            num_experts *= self.granularity
        shared_width = self.shared_expert_width(text_config)
        if shared_width is not None:
            overrides.update(shared_expert_intermediate_size=shared_width, shared_expert_gate=self.shared_expert_gate)
        config = build_moe_config(ROUTINGS[self.routing], text_config, num_experts, self.moe_layers, overrides)
        if upcycling is not None:
            config.upcycling = upcycling
        if (
            takes_top_k(ROUTINGS[self.routing])
            and config.num_experts_per_tok == 1
            and config.norm_topk_prob
            and config.num_experts > 1
        ):
            warnings.warn(
                option_error(
                    UpcyclingWarning,
                    "{num_experts_per_tok=1} with {norm_topk_prob=True}: the single renormalised gate is always 1, so "
                    "the routers get no gradient from the task loss (only from the load-balancing and z-losses). Use "
                    "{num_experts_per_tok=2} (the default) to keep the dense function at step 0 and train the "
                    "routers, or {norm_topk_prob=False} for Switch's raw gate (not exact at step 0)",
                ),
                stacklevel=3,
            )
        return config

    def expert_intermediate_size(self, text_config: PreTrainedConfig) -> int:
        """I / G: the width of each shard of the dense MLP (``granularity`` G must divide its width I)."""
        width = dense_intermediate_size(text_config)
        if width % self.granularity:
            raise OptionsError(
                [
                    (
                        f"{{granularity}} must divide the dense MLP's intermediate size ({width} for this "
                        f"{text_config.model_type} model), got {{granularity=}}",
                        {"granularity": self.granularity},
                    )
                ],
                "Invalid upcycling settings",
            )
        return width // self.granularity

    def record(self) -> dict:
        """The resolved scheme, as stored in the ``upcycling`` entry of config.json."""
        scheme = {"routing": self.routing, "expert_init": self.expert_init, "seed": self.seed}
        if self.granularity > 1:
            scheme["granularity"] = self.granularity
        if self.expert_init == "noise":
            scheme["noise_std"] = self.noise_std
        if self.expert_init == "drop":
            scheme["drop_ratio"] = self.drop_ratio
        if self.shared_expert:
            scheme["shared_expert"] = {"size": self.shared_expert_size, "gate": self.shared_expert_gate}
        return scheme


@dataclass
class WriteOptions:
    """How every conversion (upcycle, export, import) reads its source and publishes its output."""

    max_shard_size: int | str = field(default="5GB", metadata=_help("largest safetensors shard, e.g. 5GB, 500MB"))
    revision: str | None = field(default=None, metadata=_help("Hub revision (Hub ids only)"))
    overwrite: bool = field(
        default=False, metadata=_help("replace a non-empty output directory, only once the new one is complete")
    )
    progress: bool = field(default=True, metadata=_help("show a progress bar over the bytes written"))

    def _write_problems(self) -> list[tuple[str, dict]]:
        try:
            parse_size(self.max_shard_size)
        except ValueError as error:
            return [_problem(error)]
        return []


@dataclass
class NativeOptions(WriteOptions):
    """`hf_moe.export_checkpoint` / `hf_moe.import_checkpoint` (``hf-moe export`` / ``hf-moe import``)."""

    verify: bool = field(
        default=True,
        metadata=_help("verify the output: every tensor bit for bit, and both models' logits when they fit in memory"),
    )

    def __post_init__(self):
        problems = self._write_problems()
        if problems:
            raise OptionsError(problems, "Invalid conversion options")


@dataclass
class CheckpointOptions(WriteOptions):
    """How `upcycle_checkpoint` reads its source and writes its output."""

    dtype: str | None = field(
        default=None,
        metadata=_help(f"dtype of floating tensors, one of {list(DTYPES)} (unset: keep the source's)"),
    )
    format: Format = field(
        default="hf_moe",
        metadata=_help(
            "hf_moe: switch_moe/expert_choice_moe checkpoint; native: the native transformers MoE architecture, "
            "loadable without hf_moe, for settings that have one (hf-moe export --help lists them)"
        ),
    )
    verify: bool = field(
        default=False,
        metadata=_help(
            "compare every MoE layer and the whole model with the dense model; fails if function-preserving "
            "settings deviate by more than 1e-5 (relative, float32)"
        ),
    )
    allow_tokenizer_remote_code: bool = field(
        default=False,
        metadata=_help(
            "convert a source whose tokenizer needs custom code (auto_map); its code is still not copied, and the "
            "model card says so (unset: refuse such a source)"
        ),
    )

    def __post_init__(self):
        problems = self._write_problems()
        try:
            parse_dtype(self.dtype)
        except ValueError as error:
            problems.append(_problem(error))
        if self.format not in FORMATS:
            problems.append((f"{{format}} must be one of {list(FORMATS)}, got {_got(self.format)}", {}))
        if problems:
            raise OptionsError(problems, "Invalid checkpoint options")


@dataclass
class PlanOptions:
    """``hf-moe upcycle --plan``: what a conversion and the training of its output need, writing nothing."""

    plan: bool = field(
        default=False,
        metadata=_help(
            "write nothing: print, from the source's config alone, the total and active parameters, the output size, "
            "the conversion's peak memory and the per-rank training memory (with ep_size / fsdp_size)"
        ),
    )
    ep_size: int = field(default=1, metadata=_help("plan: expert-parallel ranks of the training run"))
    fsdp_size: int = field(default=1, metadata=_help("plan: FSDP ranks of the training run"))

    def __post_init__(self):
        if not self.plan:
            defaults = {f.name: f.default for f in dataclasses.fields(PlanOptions)}
            for name in ("ep_size", "fsdp_size"):
                if getattr(self, name) != defaults[name]:
                    raise OptionsError(
                        [
                            (
                                f"{{{name}}} applies to {{plan}} only, got {{{name}=}} without {{plan}}",
                                {name: getattr(self, name)},
                            )
                        ]
                    )
            return
        problems = [
            (f"{{{name}}} must be an integer >= 1, got {_got(value)}", {})
            for name, value in (("ep_size", self.ep_size), ("fsdp_size", self.fsdp_size))
            if isinstance(value, bool) or not isinstance(value, int) or value < 1
        ]
        if not problems and self.fsdp_size % self.ep_size:
            problems.append(
                (
                    "{ep_size} must divide {fsdp_size} (transformers' DistributedConfig requires it), "
                    "got {ep_size=}, {fsdp_size=}",
                    {"ep_size": self.ep_size, "fsdp_size": self.fsdp_size},
                )
            )
        if problems:
            raise OptionsError(problems, "Invalid training layout")

    def check_experts(self, num_experts: int, granularity: int = 1) -> None:
        """Every rank holds the same number of experts: ``num_experts`` (times ``granularity``, the shards of each)."""
        if not isinstance(num_experts, int) or (num_experts * granularity) % self.ep_size == 0:
            return
        if granularity == 1:
            problem = (
                "{ep_size} must divide {num_experts} (each rank holds num_experts / ep_size experts), "
                "got {ep_size=}, {num_experts=}",
                {"ep_size": self.ep_size, "num_experts": num_experts},
            )
        else:
            problem = (
                "{ep_size} must divide the {num_experts} x {granularity} experts (each rank holds the same "
                "number), got {ep_size=}, {num_experts=}, {granularity=}",
                {"ep_size": self.ep_size, "num_experts": num_experts, "granularity": granularity},
            )
        raise OptionsError([problem], "Invalid training layout")


def split_options(options: dict, *classes) -> list[dict]:
    """Keyword ``options`` split by the dataclass that owns each; a name none of them has is a TypeError."""
    parts = [{} for _ in classes]
    for name, value in options.items():
        owner = next((i for i, cls in enumerate(classes) if name in {f.name for f in dataclasses.fields(cls)}), None)
        if owner is None:
            known = sorted({f.name for cls in classes for f in dataclasses.fields(cls)})
            raise TypeError(f"unexpected option {name!r}; the options are {known}")
        parts[owner][name] = value
    return parts
