"""One schema of the upcycling options: the command line, the Python API and a recipe config give the same
`UpcyclingSettings`, ``--help`` is generated from it, and errors name each option as its caller spells it."""

import dataclasses

import pytest
import yaml
from tiny_models import tiny_dense
from transformers import AutoModelForCausalLM

from hf_moe.cli import UPCYCLE_OPTIONS, build_parser, dataclasses_from, main
from hf_moe.options import OptionsError
from hf_moe.upcycling import RoutingOptions, UpcyclingScheme, UpcyclingSettings

SCHEME = {f.name for f in dataclasses.fields(UpcyclingScheme)}

# Each case: the options as Python values, and what the MoE config built from them must hold
# (on a 4-layer decoder, so last_half and every_other differ).
CASES = {
    "every_other": ({"moe_layers": "every_other"}, {"moe_layers": [1, 3]}),
    "all": ({"moe_layers": "all"}, {"moe_layers": [0, 1, 2, 3]}),
    "last_half": ({"moe_layers": "last_half"}, {"moe_layers": [2, 3]}),
    "explicit layers": ({"moe_layers": [0, 3]}, {"moe_layers": [0, 3]}),
    "dropless": (
        {"capacity_factor": "dropless", "eval_capacity_factor": "dropless"},
        {"capacity_factor": None, "eval_capacity_factor": None},
    ),
    "capacity numbers": (
        {"capacity_factor": 1.5, "eval_capacity_factor": 2.0},
        {"capacity_factor": 1.5, "eval_capacity_factor": 2.0},
    ),
    "top-3": ({"num_experts": 4, "num_experts_per_tok": 3}, {"num_experts": 4, "num_experts_per_tok": 3}),
    "top-2 default": ({}, {"num_experts_per_tok": 2, "norm_topk_prob": True}),
    "raw gates": ({"norm_topk_prob": False}, {"norm_topk_prob": False}),
    "renormalised gates": ({"num_experts_per_tok": 2, "norm_topk_prob": True}, {"norm_topk_prob": True}),
    "copy": ({"expert_init": "copy", "seed": 3}, {}),
    "noise": ({"expert_init": "noise", "noise_std": 0.1}, {}),
    "drop": ({"expert_init": "drop", "drop_ratio": 0.25}, {}),
    "global balance": ({"balance_scope": "global_batch"}, {"balance_scope": "global_batch"}),
    "router terms": (
        {"router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.01, "router_jitter_noise": 0.1, "expert_dropout": 0.4},
        {"router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.01, "router_jitter_noise": 0.1, "expert_dropout": 0.4},
    ),
    "expert choice": (
        {
            "routing": "expert_choice",
            "capacity_factor": 1.0,
            "inference_routing": "threshold",
            "threshold_ema_decay": 0.9,
            "router_init_std": 0.05,
        },
        {"capacity_factor": 1.0, "inference_routing": "threshold", "threshold_ema_decay": 0.9, "router_init_std": 0.05},
    ),
}


def flag_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def from_cli(options: dict) -> UpcyclingSettings:
    argv = ["upcycle", "SOURCE", "OUTPUT_DIR"]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", flag_value(value)]
    return dataclasses_from(build_parser().parse_args(argv), UPCYCLE_OPTIONS)[0]


def recipe_config(options: dict) -> dict:
    """A recipe's keys: the scheme under ``upcycle``, the MoE options at the top level."""
    config = {"model_name_or_path": "m", "dataset_name": "d", "output_dir": "o"}
    config["upcycle"] = {name: value for name, value in options.items() if name in SCHEME}
    config.update({name: value for name, value in options.items() if name not in SCHEME})
    return config


def from_recipe(options: dict, tmp_path) -> UpcyclingSettings:
    from trl import TrlParser

    from hf_moe.training import DataArguments, MoeArguments, MoeSFTConfig

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_config(options)))
    moe, _, _ = TrlParser((MoeArguments, DataArguments, MoeSFTConfig)).parse_args_and_config(["--config", str(path)])
    return moe.upcycling_settings()


@pytest.mark.parametrize("options, expected", CASES.values(), ids=CASES.keys())
def test_cli_api_and_recipe_give_the_same_settings(options, expected, tmp_path):
    api = UpcyclingSettings.from_options(None, options)  # what upcycle_model / upcycle_checkpoint / plan do
    assert from_cli(options) == api
    assert from_recipe(options, tmp_path) == api
    for name, value in options.items():  # the values arrive as given (text parsed to the Python value)
        assert getattr(api, name) == value, name
    config = api.build_config(tiny_dense("llama", num_hidden_layers=4).config)
    for name, value in expected.items():
        assert getattr(config, name) == value, name


def test_every_schema_field_is_one_option_everywhere():
    """The recipe's MoE options are the schema's routing fields, not a copy; the scheme is one mapping."""
    from hf_moe.training import MoeArguments

    routing = [f.name for f in dataclasses.fields(RoutingOptions)]
    assert [f.name for f in dataclasses.fields(MoeArguments)][: len(routing)] == routing
    assert not any(f.name.startswith("upcycle_") for f in dataclasses.fields(MoeArguments))
    assert "balance_scope" in routing and "num_experts_per_tok" in routing


def test_upcycle_help_lists_every_field_with_its_help_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["upcycle", "--help"])

    def flat(text: str) -> str:  # argparse wraps lines, also after the hyphen of "re-initialised"
        return " ".join(text.split()).replace("- ", "-")

    text = flat(capsys.readouterr().out)
    for options in UPCYCLE_OPTIONS:
        for option in dataclasses.fields(options):
            flag = f"--{option.name.replace('_', '-')}"
            assert flag in text, flag
            help_text = flat(option.metadata["help"])
            start = text.index(help_text)
            after = text[start + len(help_text) : start + len(help_text) + 200]
            assert f"(default: {option.default})" in after, (option.name, after)
            if option.name in {f.name for f in dataclasses.fields(RoutingOptions)}:
                assert after.startswith(" (unset: "), (option.name, after)  # the routings' defaults, generated


def test_routing_defaults_in_help_are_the_config_classes():
    from hf_moe.modeling import ExpertChoiceMoeConfig, SwitchMoeConfig
    from hf_moe.upcycling.settings import routing_defaults

    assert routing_defaults("capacity_factor") == (
        f"switch {SwitchMoeConfig().capacity_factor}, expert_choice {ExpertChoiceMoeConfig().capacity_factor}"
    )
    assert routing_defaults("eval_capacity_factor") == "switch dropless"


# --- errors in the caller's terms -----------------------------------------------------------------------------

ERRORS = [
    (
        {"num_experts": 2, "num_experts_per_tok": 3},
        {
            "cli": "--num-experts-per-tok must be between 1 and num_experts (2), got 3",
            "api": "num_experts_per_tok must be between 1 and num_experts (2), got 3",
            "recipe": "num_experts_per_tok must be between 1 and num_experts (2), got 3",
        },
    ),
    (
        {"moe_layers": "every_third"},
        {
            "cli": "--moe-layers must be one of ['every_other', 'all', 'last_half'] or layer indices such as 0,2,5, "
            "got 'every_third'",
            "api": "moe_layers must be one of ['every_other', 'all', 'last_half']",
            "recipe": "upcycle.moe_layers must be one of ['every_other', 'all', 'last_half']",
        },
    ),
    (
        {"capacity_factor": "none"},
        {
            "cli": "--capacity-factor must be a finite number > 0 or 'dropless' (no limit), got 'none'",
            "api": "capacity_factor must be a finite number > 0 or 'dropless' (no limit), got 'none'",
            "recipe": "capacity_factor must be a finite number > 0 or 'dropless' (no limit), got 'none'",
        },
    ),
    (
        {"expert_init": "copy", "drop_ratio": 0.3},
        {
            "cli": "--drop-ratio applies to --expert-init drop only, got --expert-init copy",
            "api": "drop_ratio applies to expert_init='drop' only, got expert_init='copy'",
            "recipe": "upcycle.drop_ratio applies to upcycle.expert_init='drop' only, got upcycle.expert_init='copy'",
        },
    ),
    (
        {"routing": "expert_choice", "balance_scope": "global_batch"},
        {
            "cli": "--balance-scope is not a setting of --routing expert_choice (ExpertChoiceMoeConfig)",
            "api": "balance_scope is not a setting of routing='expert_choice' (ExpertChoiceMoeConfig)",
            "recipe": "balance_scope is not a setting of upcycle.routing='expert_choice' (ExpertChoiceMoeConfig)",
        },
    ),
]


@pytest.mark.parametrize("options, messages", ERRORS, ids=[str(sorted(o)) for o, _ in ERRORS])
def test_a_bad_value_is_named_as_the_caller_spells_it(options, messages, save_dense, tmp_path, capsys):
    _, source = save_dense("llama", num_hidden_layers=4)
    argv = ["upcycle", str(source), str(tmp_path / "moe"), "--no-progress"]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", flag_value(value)]
    assert main(argv) == 2
    assert f"hf-moe: error: Invalid upcycling settings:\n  - {messages['cli']}" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()

    from hf_moe import upcycle_model

    with pytest.raises(OptionsError) as error:
        upcycle_model(tiny_dense("llama", num_hidden_layers=4), **options)
    assert messages["api"] in str(error.value)

    from hf_moe.training import MoeArguments

    config = recipe_config(options)
    for key in ("dataset_name", "output_dir"):
        del config[key]
    with pytest.raises(ValueError, match="Invalid MoeArguments") as error:
        MoeArguments(**config)
    assert messages["recipe"] in str(error.value)


def test_unknown_api_option_names_the_options():
    from hf_moe import upcycle_model

    with pytest.raises(TypeError, match=r"unknown upcycling options \['top_k'\]; the options are \["):
        upcycle_model(tiny_dense("llama"), top_k=2)


def test_a_recipe_upcycling_with_last_half_loads(save_dense):
    """The shorthand a recipe passed through validation and then crashed on now builds the model."""
    from hf_moe.training import MoeArguments
    from hf_moe.training.model_loading import load_model_for_finetuning

    _, source = save_dense("llama", num_hidden_layers=4)
    arguments = MoeArguments(
        model_name_or_path=str(source),
        upcycle={"num_experts": 2, "moe_layers": "last_half"},
        capacity_factor="dropless",
    )
    model = load_model_for_finetuning(arguments, AutoModelForCausalLM)
    assert model.config.moe_layers == [2, 3] and model.config.capacity_factor is None
    assert arguments.upcycle["moe_layers"] == "last_half" and arguments.upcycle["routing"] == "switch"


@pytest.mark.parametrize("name", ["capacity_factor", "eval_capacity_factor"])
def test_api_refuses_none_for_a_capacity_rather_than_guess(name):
    """None once meant "no limit" in the API; read as "unset" it would quietly give capacity_factor's 1.25."""
    with pytest.raises(ValueError, match=rf"{name}=None is ambiguous: no capacity limit is {name}='dropless'"):
        UpcyclingSettings.from_options(None, {name: None})
    assert UpcyclingSettings.from_options(None, {name: "dropless"}).routing_values()[name] is None
