"""Recipe options: YAML plus flags through TrlParser, strict keys, every bad value reported at start."""

import logging
from pathlib import Path

import pytest
from recipe_helpers import REPO, classification_settings, clm_settings, run_recipe, write_settings
from trl import TrlParser

import hf_moe
from hf_moe.training import ClassificationDataArguments, DataArguments, MoeArguments, MoeSFTConfig

SHIPPED = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
CLM = (MoeArguments, DataArguments, MoeSFTConfig)


def parse(classes, argv):
    return TrlParser(classes).parse_args_and_config(argv)


def test_yaml_and_flags_fill_the_three_dataclasses(tmp_path):
    path = write_settings(
        tmp_path / "c.yaml",
        {"model_name_or_path": "m", "output_dir": "o", "dataset_name": "d", "learning_rate": 1e-4, "lora_r": 4},
    )
    flags = ["--max_steps", "7", "--packing", "false", "--lora_target_parameters", "mlp.experts.down_proj.weight"]
    flags += ["--train_parameters", "lora", "--capacity_factor", "dropless", "--upcycle", '{"moe_layers": "1,3"}']
    moe, data, training = parse(CLM, ["--config", path, *flags])
    assert training.learning_rate == 1e-4 and training.max_steps == 7 and training.packing is False
    assert moe.lora_r == 4 and moe.lora_target_parameters == ["mlp.experts.down_proj.weight"]
    assert moe.capacity_factor == "dropless" and moe.upcycling_settings().moe_layers == [1, 3]
    assert data.dataset_name == "d"


def test_unknown_yaml_key_and_flag_are_errors(tmp_path):
    path = write_settings(tmp_path / "c.yaml", {"model_name_or_path": "m", "dataset_name": "d", "learning_rat": 1e-3})
    with pytest.raises(ValueError, match=r"Unknown arguments from config file: \['--learning_rat'"):
        parse(CLM, ["--config", path])
    path = write_settings(tmp_path / "d.yaml", {"model_name_or_path": "m", "dataset_name": "d"})
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--block_size', '8'\]"):
        parse(CLM, ["--config", path, "--block_size", "8"])
    # TRL's own Mixtral-style coefficient is not a flag of the recipe: ours is MoeArguments'.
    moe, _, training = parse(CLM, ["--config", path, "--router_aux_loss_coef", "0.1"])
    assert moe.router_aux_loss_coef == 0.1 and training.router_aux_loss_coef is None


def test_bad_values_are_reported_together():
    with pytest.raises(ValueError) as error:
        MoeArguments(
            model_name_or_path="m",
            train_parameters="experts",
            expert_dropout=1.5,
            capacity_factor="lots",
            router_z_loss_coef=-1.0,
            upcycle={"routing": "hash"},
        )
    message = str(error.value)
    for expected in (
        "train_parameters must be one of ['all', 'non_moe', 'routers', 'lora'], got 'experts'",
        "expert_dropout must be a finite number in [0, 1), got 1.5",
        "capacity_factor must be a finite number > 0 or 'dropless' (no limit), got 'lots'",
        "router_z_loss_coef must be a finite number >= 0, got -1.0",
        "upcycle.routing must be one of ['switch', 'expert_choice', 'aux_free'], got 'hash'",
    ):
        assert expected in message
    with pytest.raises(ValueError, match="train_parameters 'lora' needs lora_target_modules"):
        MoeArguments(model_name_or_path="m", train_parameters="lora")
    with pytest.raises(ValueError, match="prompt_column and response_column go together"):
        DataArguments(dataset_name="d", prompt_column="p")
    with pytest.raises(ValueError, match="max_length must be >= 2, got 1"):
        ClassificationDataArguments(dataset_name="d", max_length=1)


def test_missing_data_file_fails_with_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_file: no such file"):
        DataArguments(train_file=str(tmp_path / "nothing.jsonl"))
    with pytest.raises(ValueError, match=r"train_file must end with one of \['.csv'"):
        DataArguments(train_file=str(tmp_path / "data.xlsx"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_parse_and_name_their_command(path: Path, tmp_path, monkeypatch):
    text = path.read_text()
    recipe = "finetune_classification" if path.name.startswith("classification") else "finetune_clm"
    assert f"recipes/{recipe}.py --config recipes/configs/{path.name}" in text
    # Data files are the demo's output or the user's own (said so in the file): create empty stand-ins.
    monkeypatch.chdir(tmp_path)
    for line in text.splitlines():
        if line.startswith(("train_file:", "validation_file:")):
            file = tmp_path / line.split(":", 1)[1].split("#")[0].strip()
            file.parent.mkdir(parents=True, exist_ok=True)
            file.touch()
            if not file.name.startswith(("train", "validation")):
                assert "user data" in line or "USER DATA" in text, f"{path.name}: say that {file.name} is user data"
    if recipe == "finetune_clm":
        parse(CLM, ["--config", str(path)])
    else:
        from transformers import TrainingArguments

        parse(
            (MoeArguments, ClassificationDataArguments, TrainingArguments), ["--config", str(path), "--use_cpu", "true"]
        )


def test_column_not_found_fails_at_start(assets, tmp_path):
    with pytest.raises(
        ValueError, match=r"text_column 'sentence' not found in the train data; its columns are \['text'\]"
    ):
        run_recipe("finetune_clm", clm_settings(assets, tmp_path / "out", text_column="sentence"), tmp_path)
    with pytest.raises(ValueError, match=r"label_column 'stars' not found in the train data"):
        settings = classification_settings(assets, tmp_path / "c", label_column="stars")
        run_recipe("finetune_classification", settings, tmp_path)


def test_lora_target_matching_nothing_fails_at_start(assets, tmp_path):
    settings = clm_settings(assets, tmp_path / "out", train_parameters="lora", lora_target_modules=["query"])
    with pytest.raises(ValueError, match=r"LoRA targets match nothing in the model: lora_target_modules \['query'\]"):
        run_recipe("finetune_clm", settings, tmp_path)


def test_dense_checkpoint_without_upcycling_fails(assets, tmp_path):
    with pytest.raises(ValueError, match="is a dense 'llama' checkpoint: set upcycle"):
        run_recipe("finetune_clm", clm_settings(assets, tmp_path / "out", model_name_or_path=assets["dense"]), tmp_path)


def test_option_the_architecture_lacks_fails(assets, tmp_path):
    settings = clm_settings(
        assets, tmp_path / "out", model_name_or_path=assets["dense"], upcycle={"routing": "expert_choice"}
    )
    settings["router_aux_loss_coef"] = 0.1
    with pytest.raises(ValueError, match="router_aux_loss_coef is not a setting of upcycle.routing='expert_choice'"):
        run_recipe("finetune_clm", settings, tmp_path)


def test_sequences_longer_than_the_positions_are_truncated_with_a_warning(assets, tmp_path, caplog):
    # The tiny llama has max_position_embeddings 128.
    with caplog.at_level(logging.WARNING, logger="hf_moe.training"):
        result = run_recipe(
            "finetune_clm", clm_settings(assets, tmp_path / "out", max_length=512, max_steps=1), tmp_path
        )
    assert (
        "max_length 512 exceeds the model's max_position_embeddings (128): sequences are truncated to 128"
        in caplog.text
    )
    assert result["history"][-1]["validation"]["loss"] > 0
    with caplog.at_level(logging.WARNING, logger="hf_moe.training"):
        settings = classification_settings(assets, tmp_path / "c", max_length=300, max_steps=1)
        run_recipe("finetune_classification", settings, tmp_path)
    assert "max_length 300 exceeds the model's max_position_embeddings (128)" in caplog.text


def test_gpt2_positions_limit_is_n_positions(caplog):
    from types import SimpleNamespace

    from transformers import GPT2Config

    from hf_moe.training.model_loading import fit_length_to_positions

    model = SimpleNamespace(
        config=hf_moe.SwitchMoeConfig(text_config=GPT2Config(n_positions=64, n_layer=2), num_experts=2)
    )
    with caplog.at_level(logging.WARNING, logger="hf_moe.training"):
        assert fit_length_to_positions(model, 128, "max_length") == 64
        assert fit_length_to_positions(model, 32, "max_length") == 32
    assert "max_length 128 exceeds the model's n_positions (64): sequences are truncated to 64 tokens" in caplog.text


@pytest.mark.parametrize("config_class", ["SwitchMoeConfig", "ExpertChoiceMoeConfig"])
def test_lora_keeps_expert_choice_thresholds_in_the_adapter(config_class, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_moe
    from hf_moe.training import MoeArguments
    from hf_moe.training.trainable import select_trainable_parameters

    dense = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    model = AutoModelForCausalLM.from_config(getattr(hf_moe, config_class)(text_config=dense, num_experts=4))
    arguments = MoeArguments(model_name_or_path="m", train_parameters="lora", lora_target_modules=["q_proj"])
    peft_model = select_trainable_parameters(model, arguments)
    peft_model.train()
    peft_model(torch.randint(0, 64, (2, 8)))  # a training forward moves the thresholds
    peft_model.save_pretrained(tmp_path / "adapter")
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as saved:
        has_thresholds = any("score_thresholds" in key for key in saved.keys())
    assert has_thresholds == (config_class == "ExpertChoiceMoeConfig")


def test_sharding_and_balancing_options_are_checked(tmp_path):
    with pytest.raises(ValueError) as error:
        MoeArguments(model_name_or_path="m", balance_scope="global", distributed_config={"fsdp": 2})
    message = str(error.value)
    assert "balance_scope must be one of ['micro_batch', 'global_batch'], got 'global'" in message
    assert "distributed_config keys must be among ['tp_size', " in message and "got ['fsdp']" in message
    with pytest.raises(ValueError, match="distributed_config must be a JSON object of DistributedConfig fields"):
        MoeArguments(model_name_or_path="m", distributed_config="fsdp_size=2")
    with pytest.raises(ValueError, match="upcycle it first .* got upcycle set"):
        MoeArguments(model_name_or_path="m", upcycle={"routing": "switch"}, distributed_config={"fsdp_size": 2})
    with pytest.raises(ValueError, match="distributed_config does not apply to train_parameters 'lora'"):
        MoeArguments(
            model_name_or_path="m", train_parameters="lora", lora_target_modules=["q_proj"], distributed_config={}
        )
    # The JSON of the command line and the mapping of a YAML file give the same dict.
    settings = {
        "model_name_or_path": "m",
        "output_dir": "o",
        "dataset_name": "d",
        "distributed_config": {"fsdp_size": 2},
    }
    path = write_settings(tmp_path / "s.yaml", settings)
    from_yaml = parse(CLM, ["--config", path])[0]
    from_flag = parse(CLM, ["--config", path, "--distributed_config", '{"fsdp_size": 2, "ep_size": 2}'])[0]
    assert from_yaml.distributed_config == {"fsdp_size": 2}
    assert from_flag.distributed_config == {"fsdp_size": 2, "ep_size": 2}
