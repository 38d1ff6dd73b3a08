"""The strict schema of an upcycling run: what to build and how to initialise it.

Routing and loss settings are fields of the MoE configuration classes and are validated there
(`SwitchMoeConfig`, `ExpertChoiceMoeConfig`); this module only checks the converter's own
options and rejects configuration keys the chosen routing does not have.
"""

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

from transformers import PreTrainedConfig

from ..modeling.registry import ROUTING_CONFIGS

ROUTINGS = ROUTING_CONFIGS  # routing name -> config class, read from the registry at each access
EXPERT_INITS = ("copy", "noise", "drop")
DEFAULT_NOISE_STD = 0.01
# Token-choice defaults of an upcycled model: renormalised top-2 computes the dense function at step 0
# (copied experts, gates summing to 1) and its router learns from the task loss, whereas the single
# renormalised gate of top-1 is always exactly 1 and passes the router no gradient (measured router
# gradient norm from the task loss after copy upcycling: top-1 ~1e-9, top-2 ~2e-3; README, Upcycling).
# Top-2 is also what sparse upcycling uses for decoders (Komatsuzaki et al. 2023, §3.1).
UPCYCLING_TOP_K = 2
UPCYCLING_NORM_TOPK_PROB = True


def is_finite_number(value) -> bool:
    """An int or float that is neither nan nor infinite (nan passes every ``< 0`` check)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class UpcyclingWarning(UserWarning):
    """Settings that convert, but that a user most likely does not want."""


# Set by the converter itself, not by overrides.
_RESERVED_FIELDS = {"text_config", "num_experts", "moe_layers", "tie_word_embeddings"}


def config_fields(config_class) -> list[str]:
    """The MoE settings a run may override for one routing (the config's own dataclass fields)."""
    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    return [f.name for f in dataclasses.fields(config_class) if f.name not in base | _RESERVED_FIELDS]


@dataclass(frozen=True)
class UpcyclingSettings:
    """Options of one dense -> MoE conversion.

    Args:
        routing: ``"switch"`` (token choice, `SwitchMoeConfig`) or ``"expert_choice"`` (`ExpertChoiceMoeConfig`).
        num_experts: experts per MoE layer.
        moe_layers: layer indices, or ``"every_other"`` / ``"all"`` / ``"last_half"``.
        expert_init: ``"copy"`` (every expert the dense MLP; Komatsuzaki et al. 2023), ``"noise"``
            (copy plus N(0, (noise_std * std(W))^2) on every expert weight matrix), ``"drop"``
            (Drop-Upcycling, Nakamura et al. 2025: per expert, re-initialise a random fraction
            ``drop_ratio`` of the intermediate neurons).
        noise_std: noise scale relative to each weight matrix's std (``expert_init="noise"``).
        drop_ratio: fraction of intermediate neurons re-initialised per expert (``expert_init="drop"``).
        seed: seeds the routers and the noise / dropped neurons; the same seed gives the same tensors.
        config_overrides: further fields of the MoE config (``num_experts_per_tok``, ``capacity_factor``, ...).
            For token choice ``num_experts_per_tok`` defaults to 2 and ``norm_topk_prob`` to True here
            (unlike the config's 1 and False): the upcycled model starts out computing the dense
            function and its routers learn from the task loss. Top-1 with renormalised gates is
            accepted with a warning: its gate is always 1, so the routers learn only from the router losses.
    """

    routing: str = "switch"
    num_experts: int = 8
    moe_layers: str | list[int] | tuple[int, ...] = "every_other"
    expert_init: str = "copy"
    noise_std: float = DEFAULT_NOISE_STD
    drop_ratio: float = 0.5
    seed: int = 0
    config_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        problems = []
        if self.routing not in ROUTINGS:
            problems.append(f"routing must be one of {list(ROUTINGS)}, got {self.routing!r}")
        if self.expert_init not in EXPERT_INITS:
            problems.append(f"expert_init must be one of {list(EXPERT_INITS)}, got {self.expert_init!r}")
        if not is_finite_number(self.noise_std) or self.noise_std < 0:
            problems.append(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")
        if not is_finite_number(self.drop_ratio) or not 0 <= self.drop_ratio <= 1:
            problems.append(f"drop_ratio must be a finite number in [0, 1], got {self.drop_ratio!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.routing in ROUTINGS:
            allowed = config_fields(ROUTINGS[self.routing])
            unknown = sorted(set(self.config_overrides) - set(allowed))
            if unknown:
                problems.append(
                    f"{unknown} {'is not a setting' if len(unknown) == 1 else 'are not settings'} of routing "
                    f"{self.routing!r} ({ROUTINGS[self.routing].__name__}); allowed: {allowed}"
                )
        if problems:
            raise ValueError("Invalid upcycling settings:\n  - " + "\n  - ".join(problems))

    def build_config(self, text_config: PreTrainedConfig, upcycling: dict | None = None) -> PreTrainedConfig:
        """The MoE config around ``text_config``; the config class validates the routing settings."""
        overrides = dict(self.config_overrides)
        if self.routing == "switch":
            overrides.setdefault("norm_topk_prob", UPCYCLING_NORM_TOPK_PROB)
            if isinstance(self.num_experts, int) and self.num_experts >= 1:
                overrides.setdefault("num_experts_per_tok", min(UPCYCLING_TOP_K, self.num_experts))
        moe_layers = list(self.moe_layers) if isinstance(self.moe_layers, tuple) else self.moe_layers
        config = ROUTINGS[self.routing](
            text_config=text_config, num_experts=self.num_experts, moe_layers=moe_layers, **overrides
        )
        if upcycling is not None:
            config.upcycling = upcycling
        if (
            self.routing == "switch"
            and config.num_experts_per_tok == 1
            and config.norm_topk_prob
            and config.num_experts > 1
        ):
            warnings.warn(
                "num_experts_per_tok=1 with norm_topk_prob=True: the single renormalised gate is always 1, so the "
                "routers get no gradient from the task loss (only from the load-balancing and z-losses). Use "
                "num_experts_per_tok=2 (the default) to keep the dense function at step 0 and train the routers, "
                "or norm_topk_prob=False for Switch's raw gate (not exact at step 0)",
                UpcyclingWarning,
                stacklevel=3,
            )
        return config

    def record(self) -> dict:
        """The resolved scheme, as stored in the ``upcycling`` entry of config.json."""
        scheme = {"routing": self.routing, "expert_init": self.expert_init, "seed": self.seed}
        if self.expert_init == "noise":
            scheme["noise_std"] = self.noise_std
        if self.expert_init == "drop":
            scheme["drop_ratio"] = self.drop_ratio
        return scheme
