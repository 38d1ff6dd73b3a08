"""Configurations: defaults from docs/moe-reference.md, JSON round trip, validation messages."""

import json

import pytest
from backbones import dense_config
from transformers import AutoConfig

import hf_moe


def test_switch_defaults_follow_the_papers():
    config = hf_moe.SwitchMoeConfig(text_config=dense_config("llama"))
    assert config.num_experts_per_tok == 1 and config.norm_topk_prob is False  # Switch: top-1, raw gate
    assert config.router_aux_loss_coef == 1e-2 and config.router_z_loss_coef == 1e-3
    assert config.capacity_factor == 1.25 and config.eval_capacity_factor is None  # ST-MoE train CF; dropless eval
    assert config.router_init_std == 0.02 and config.expert_dropout == 0.0 and config.router_jitter_noise == 0.0
    assert config.moe_layers == [1, 3]  # every other layer, stored as indices


def test_expert_choice_defaults_follow_the_paper():
    config = hf_moe.ExpertChoiceMoeConfig(text_config=dense_config("llama"))
    assert config.capacity_factor == 2.0 and config.router_z_loss_coef == 1e-3
    assert config.inference_routing is None
    assert not hasattr(config, "router_aux_loss_coef")  # no balancing loss needed (Zhou et al.)


@pytest.mark.parametrize(
    "shorthand, expected", [("all", [0, 1, 2, 3]), ("every_other", [1, 3]), ("last_half", [2, 3]), ([3, 0], [0, 3])]
)
def test_moe_layers_shorthands_resolve_to_indices(shorthand, expected):
    assert hf_moe.SwitchMoeConfig(text_config=dense_config("llama"), moe_layers=shorthand).moe_layers == expected


@pytest.mark.parametrize("config_class", [hf_moe.SwitchMoeConfig, hf_moe.ExpertChoiceMoeConfig])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_json_round_trip_is_exact(config_class, model_type, tmp_path):
    config = config_class(
        text_config=dense_config(model_type).to_dict(), num_experts=6, moe_layers=[0, 2], expert_dropout=0.4
    )
    assert config.text_config.model_type == model_type
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == config_class.model_type and saved["moe_layers"] == [0, 2]
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is config_class
    loaded.name_or_path = config.name_or_path  # where it was read from is not part of the config
    assert loaded.to_dict() == config.to_dict()
    assert config_class.from_json_file(tmp_path / "config.json").to_json_string() == config.to_json_string()
    assert type(loaded.text_config) is type(config.text_config)


SWITCH_ERRORS = [
    ({"num_experts": 0}, "num_experts must be an integer >= 1, got 0"),
    (
        {"num_experts": 4, "num_experts_per_tok": 12},
        r"num_experts_per_tok must be between 1 and num_experts \(4\), got 12",
    ),
    ({"moe_layers": [0, 9]}, r"moe_layers must be between 0 and 3 \(num_hidden_layers=4\), got \[9\]"),
    (
        {"moe_layers": "odd"},
        r"moe_layers must be a list of layer indices or one of \['all', 'every_other', 'last_half'\], got 'odd'",
    ),
    ({"moe_layers": [1, 1]}, r"moe_layers must not repeat a layer, got \[1, 1\]"),
    ({"moe_layers": []}, r"moe_layers must name at least one layer, got \[\]"),
    ({"moe_layers": [1.5]}, r"moe_layers must be a list of integer layer indices, got \[1.5\]"),
    ({"capacity_factor": 0}, r"capacity_factor must be a finite number > 0 or None \(dropless\), got 0"),
    ({"eval_capacity_factor": "big"}, r"eval_capacity_factor must be a finite number > 0 or None .*, got 'big'"),
    ({"router_jitter_noise": 1.5}, r"router_jitter_noise must be a finite number in \[0, 1\), got 1.5"),
    ({"router_aux_loss_coef": -1}, "router_aux_loss_coef must be a finite number >= 0, got -1"),
    ({"router_z_loss_coef": -0.1}, "router_z_loss_coef must be a finite number >= 0, got -0.1"),
    ({"router_init_std": -1}, "router_init_std must be a finite number >= 0, got -1"),
    ({"expert_dropout": 1.0}, r"expert_dropout must be a finite number in \[0, 1\), got 1.0"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob must be True or False, got 'yes'"),
]


@pytest.mark.parametrize("overrides, message", SWITCH_ERRORS)
def test_switch_validation_names_the_field_the_allowed_values_and_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        hf_moe.SwitchMoeConfig(text_config=dense_config("llama"), **overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"capacity_factor": None}, "capacity_factor must be a finite number > 0, got None"),
        (
            {"inference_routing": "causal"},
            r"inference_routing must be one of \['expert_choice', 'threshold'\] or None, got 'causal'",
        ),
        ({"threshold_ema_decay": 1.0}, r"threshold_ema_decay must be a finite number in \[0, 1\), got 1.0"),
        ({"num_experts": -2}, "num_experts must be an integer >= 1, got -2"),
    ],
)
def test_expert_choice_validation_messages(overrides, message):
    with pytest.raises(ValueError, match=message):
        hf_moe.ExpertChoiceMoeConfig(text_config=dense_config("llama"), **overrides)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as error:
        hf_moe.SwitchMoeConfig(
            text_config=dense_config("llama"), num_experts=4, num_experts_per_tok=5, moe_layers=[7], expert_dropout=2
        )
    message = str(error.value)
    assert message.startswith("Invalid SwitchMoeConfig:")
    for field in ("num_experts_per_tok", "moe_layers", "expert_dropout"):
        assert field in message
