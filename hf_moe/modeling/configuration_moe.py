"""What the configurations of every hf_moe architecture share (`MoeConfig`); each routing method's
config subclasses it in that method's module (``switch.py``, ``expert_choice.py``).

Every config nests the dense decoder they transform as ``text_config`` (any decoder config transformers
knows) and list the layers whose feed-forward block becomes a sparse MoE block in ``moe_layers``.
Defaults follow Fedus et al. 2021, "Switch Transformers" (eq. 2-4, Table 4) and Zoph et al. 2022,
"ST-MoE" (eq. 5, §4).

This file is copied next to saved checkpoints for ``trust_remote_code``: relative imports only.
"""

import math

import transformers
from packaging.version import Version  # a dependency of transformers

# The release of this code; the oldest transformers release it runs on (the lower bound of hf_moe's
# transformers range, proven by CI's lowest suite) and the newest release CI has run it with. The
# tested release is a record, not a cap. All three are written into every saved config.json: this
# file travels with checkpoints and meets other transformers releases.
HF_MOE_VERSION = "0.2.0"
MIN_TRANSFORMERS = "5.23.0"
TESTED_TRANSFORMERS = "5.25.0"

# Checked before anything newer than MIN_TRANSFORMERS is imported (SubConfigSpec below), so an older
# release (say a serving engine's) gets this message rather than an ImportError about one name.
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(
        f"This checkpoint's code (hf_moe {HF_MOE_VERSION}) needs transformers>={MIN_TRANSFORMERS} "
        f"(tested with {TESTED_TRANSFORMERS}), but transformers {transformers.__version__} is installed: "
        f'pip install "transformers>={MIN_TRANSFORMERS}"'
    )

from transformers import AutoConfig, PreTrainedConfig  # noqa: E402  (after the release check)
from transformers.configuration_utils import SubConfigSpec  # noqa: E402

MOE_LAYER_SHORTHANDS = ("all", "every_other", "last_half")
# Label fields of a classifier: the nested decoder builds the head, pipelines read the outer config.
LABEL_FIELDS = ("id2label", "label2id")
BALANCE_SCOPES = ("micro_batch", "global_batch")


def resolve_moe_layers(moe_layers, num_hidden_layers: int) -> list[int]:
    """Turn a shorthand or an explicit list into sorted layer indices.

    ``"every_other"`` takes the odd layers (1, 3, 5, ...), as in Switch and sparse upcycling, where
    every other feed-forward block is replaced.
    """
    if moe_layers == "all":
        return list(range(num_hidden_layers))
    if moe_layers == "every_other":
        return list(range(1, num_hidden_layers, 2))
    if moe_layers == "last_half":
        return list(range(num_hidden_layers // 2, num_hidden_layers))
    return sorted(moe_layers)


class MoeConfig(PreTrainedConfig):
    """Fields and validation shared by both architectures; every problem is reported at once."""

    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    num_experts: int = 8
    moe_layers: list[int] | str = "every_other"
    # The experts' intermediate width (transformers' name, as in Qwen3-MoE); None: the dense MLP's own.
    moe_intermediate_size: int | None = None
    router_z_loss_coef: float = 1e-3
    expert_dropout: float = 0.0
    router_init_std: float = 0.02
    output_router_logits: bool = False
    tie_word_embeddings: bool = False
    # An always-on shared expert beside the routed ones (DeepSeekMoE, Dai et al. 2024, arXiv 2401.06066;
    # Qwen2-MoE): the dense MLP's own module with this many intermediate neurons; None or 0: none.
    shared_expert_intermediate_size: int | None = None
    # Scale the shared expert's output by sigmoid(shared_expert_gate(x)), a Linear(hidden, 1) without bias,
    # per token (Qwen2-MoE); False adds it unscaled (DeepSeekMoE).
    shared_expert_gate: bool = False

    def __post_init__(self, **kwargs):
        # A classifier's labels are one set on both configs: the nested decoder builds the head from
        # its own, pipelines and Trainer read the outer ones. Labels given to the outer config (or
        # num_labels) win and are copied in by __setattr__; otherwise the nested config's are taken.
        text = self.text_config  # a dict, a config object or None (the default decoder) at this point
        id2label, label2id = (text.get(n) if isinstance(text, dict) else getattr(text, n, None) for n in LABEL_FIELDS)
        if self.id2label is None and kwargs.get("num_labels") is None and id2label is not None:
            self.id2label = {int(i): label for i, label in id2label.items()}
            self.label2id = dict(label2id or {label: i for i, label in self.id2label.items()})
        super().__post_init__(**kwargs)
        for name in LABEL_FIELDS:  # also when they were set before text_config became a config object
            setattr(self, name, getattr(self, name))
        # The nested decoder owns embedding tying; mirror it so the outer model reports it too.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    def to_dict(self) -> dict:
        output = super().to_dict()
        # Which code wrote this checkpoint, the oldest transformers release that code runs on and
        # the newest one it was tested with.
        output["hf_moe_version"] = HF_MOE_VERSION
        output["hf_moe_min_transformers"] = MIN_TRANSFORMERS
        output["hf_moe_tested_transformers"] = TESTED_TRANSFORMERS
        return output

    def __setattr__(self, key, value):
        super().__setattr__(key, value)
        # num_labels is a property that sets both label fields, so it is mirrored too.
        if key in LABEL_FIELDS and isinstance(self.__dict__.get("text_config"), PreTrainedConfig):
            setattr(self.text_config, key, dict(value) if value is not None else None)

    def _moe_problems(self) -> list[str]:
        problems = []
        num_layers = self.text_config.num_hidden_layers
        layers = self.moe_layers
        if isinstance(layers, str):
            if layers not in MOE_LAYER_SHORTHANDS:
                problems.append(
                    f"moe_layers must be a list of layer indices or one of {list(MOE_LAYER_SHORTHANDS)}, got {layers!r}"
                )
        elif not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) for i in layers):
            problems.append(f"moe_layers must be a list of integer layer indices, got {layers!r}")
        else:
            bad = [i for i in layers if not 0 <= i < num_layers]
            if bad:
                problems.append(
                    f"moe_layers must be between 0 and {num_layers - 1} (num_hidden_layers={num_layers}), got {bad}"
                )
            elif len(set(layers)) != len(layers):
                problems.append(f"moe_layers must not repeat a layer, got {list(layers)}")
            elif not layers:
                problems.append("moe_layers must name at least one layer, got []")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            problems.append(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        size = self.moe_intermediate_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            problems.append(f"moe_intermediate_size must be an integer >= 1 or None (the dense MLP's), got {size!r}")
        problems += check_number("router_z_loss_coef", self.router_z_loss_coef, ">= 0", lambda v: v >= 0)
        problems += check_number("router_init_std", self.router_init_std, ">= 0", lambda v: v >= 0)
        problems += check_number("expert_dropout", self.expert_dropout, "in [0, 1)", lambda v: 0 <= v < 1)
        return problems + self._shared_expert_problems()

    def _shared_expert_problems(self) -> list[str]:
        size, gate = self.shared_expert_intermediate_size, self.shared_expert_gate
        problems = []
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            problems.append(
                f"shared_expert_intermediate_size must be an integer >= 0 or None (no shared expert), got {size!r}"
            )
        if not isinstance(gate, bool):
            problems.append(f"shared_expert_gate must be True or False, got {gate!r}")
        elif gate and not size:
            problems.append(
                f"shared_expert_gate=True needs a shared expert (shared_expert_intermediate_size >= 1), got {size!r}"
            )
        return problems

    def _finish(self, problems: list[str]) -> None:
        if problems:
            raise ValueError(f"Invalid {type(self).__name__}:\n  - " + "\n  - ".join(problems))
        self.moe_layers = resolve_moe_layers(self.moe_layers, self.text_config.num_hidden_layers)


def check_number(name: str, value, allowed: str, in_range, allow_none: bool = False) -> list[str]:
    """``name must be a finite number <allowed>, got <value>`` unless ``value`` is one (nan and inf
    fail every range comparison's intent: ``nan < 0`` is False)."""
    if value is None and allow_none:
        return []
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not finite or not in_range(value):
        return [f"{name} must be a finite number {allowed}, got {value!r}"]
    return []


def check_capacity(name: str, value, allow_none: bool) -> list[str]:
    return check_number(name, value, "> 0 or None (dropless)" if allow_none else "> 0", lambda v: v > 0, allow_none)
