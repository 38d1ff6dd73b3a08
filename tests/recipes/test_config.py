"""Recipe settings: strict parsing, conversions, overrides, and bad configs failing at start with a clear message."""

from pathlib import Path

import pytest
import yaml
from recipe_helpers import REPO, classification_settings, clm_settings, run_recipe, write_settings

from hf_moe.training import CausalLMConfig, ClassificationConfig, parse_recipe_args

SHIPPED = sorted((REPO / "recipes" / "configs").glob("*.yaml"))


def test_yaml_and_flags_convert_to_field_types(tmp_path):
    path = write_settings(
        tmp_path / "c.yaml",
        {
            "model_name_or_path": "m",
            "output_dir": "o",
            "dataset_name": "d",
            "learning_rate": "1e-4",
            "lora": {"r": 4, "target_modules": ["q_proj"]},
            "train_parameters": "lora",
        },
    )
    config = parse_recipe_args(
        CausalLMConfig,
        [
            "--config",
            path,
            "--max_steps",
            "7",
            "--packing=false",
            "--lora.r",
            "16",
            "--lora.target_parameters",
            "mlp.experts.down_proj.weight",
            "--capacity_factor",
            "null",
            "--report_to",
            "[tensorboard]",
        ],
    )
    assert config.learning_rate == 1e-4 and isinstance(config.learning_rate, float)
    assert config.max_steps == 7 and config.packing is False
    assert config.lora.r == 16 and config.lora.target_modules == ["q_proj"]
    assert config.lora.target_parameters == ["mlp.experts.down_proj.weight"]
    assert config.capacity_factor is None and config.report_to == ["tensorboard"]


def test_unknown_yaml_key_is_an_error(tmp_path):
    path = write_settings(
        tmp_path / "c.yaml", {"model_name_or_path": "m", "output_dir": "o", "dataset_name": "d", "learning_rat": 1e-3}
    )
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rat'\]"):
        parse_recipe_args(CausalLMConfig, ["--config", path])


def test_unknown_flag_and_nested_key_are_errors(tmp_path):
    path = write_settings(tmp_path / "c.yaml", {"model_name_or_path": "m", "output_dir": "o", "dataset_name": "d"})
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) \['block_sise'\] for CausalLMConfig; did you mean 'block_size'\?"
    ):
        parse_recipe_args(CausalLMConfig, ["--config", path, "--block_sise", "8"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['upcycle.num_expert'\]"):
        parse_recipe_args(CausalLMConfig, ["--config", path, "--upcycle.num_expert", "8"])
    # A causal-LM key is unknown to the classification recipe.
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['block_size'\] for ClassificationConfig"):
        parse_recipe_args(ClassificationConfig, ["--config", path, "--block_size", "8"])


def test_bad_values_are_reported_together(tmp_path):
    path = write_settings(tmp_path / "c.yaml", {"model_name_or_path": "m", "output_dir": "o", "dataset_name": "d"})
    with pytest.raises(ValueError) as error:
        parse_recipe_args(
            CausalLMConfig,
            [
                "--config",
                path,
                "--train_parameters",
                "experts",
                "--expert_dropout",
                "1.5",
                "--max_steps",
                "three",
                "--metric_for_best_model",
                "accuracy",
            ],
        )
    message = str(error.value)
    assert "max_steps must be an integer, got 'three'" in message
    # The value checks run once every type is right, and list every problem.
    with pytest.raises(ValueError) as error:
        parse_recipe_args(
            CausalLMConfig,
            [
                "--config",
                path,
                "--train_parameters",
                "experts",
                "--expert_dropout",
                "1.5",
                "--metric_for_best_model",
                "accuracy",
                "--lr_scheduler_type",
                "triangle",
            ],
        )
    message = str(error.value)
    assert "lr_scheduler_type must be one of ['linear', 'cosine'," in message and "got 'triangle'" in message
    assert "train_parameters must be one of ['all', 'non_moe', 'routers', 'lora'], got 'experts'" in message
    assert "expert_dropout must be in [0, 1), got 1.5" in message
    assert "metric_for_best_model must be one of ['loss', 'perplexity'], got 'accuracy'" in message


def test_missing_files_fail_with_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="--config: no such file"):
        parse_recipe_args(CausalLMConfig, ["--config", str(tmp_path / "nope.yaml")])
    path = write_settings(
        tmp_path / "c.yaml",
        {"model_name_or_path": "m", "output_dir": "o", "train_file": str(tmp_path / "missing.jsonl")},
    )
    with pytest.raises(FileNotFoundError, match=r"train_file: no such file or folder .*missing.jsonl"):
        parse_recipe_args(CausalLMConfig, ["--config", path])


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_parse_and_name_their_command(path: Path, tmp_path):
    recipe = "finetune_classification" if path.name.startswith("classification") else "finetune_clm"
    assert f"recipes/{recipe}.py --config recipes/configs/{path.name}" in path.read_text(), (
        "the header must give the command"
    )
    config_class = ClassificationConfig if recipe == "finetune_classification" else CausalLMConfig
    # Their data files are made by the demo or by the user: check the schema and values only.
    values = yaml.safe_load(path.read_text())
    for key in ("train_file", "validation_file", "resume_from_checkpoint"):
        values.pop(key, None)
    values.setdefault("dataset_name", "placeholder")
    config = parse_recipe_args(config_class, ["--config", write_settings(tmp_path / path.name, values)])
    assert config.output_dir and config.model_name_or_path


def test_column_not_found_fails_at_start(assets, tmp_path):
    settings = clm_settings(
        assets,
        tmp_path / "out",
        train_file=str(assets["root"] / "train.jsonl"),
        validation_file=None,
        text_column="content",
    )
    with pytest.raises(
        ValueError, match=r"text_column 'content' not found in the train data; its columns are \['body'\]"
    ):
        run_recipe("finetune_clm", settings, tmp_path)
    settings = classification_settings(assets, tmp_path / "out", label_column="target")
    with pytest.raises(
        ValueError, match=r"label_column 'target' not found in the train data; its columns are \['sentence', 'label'\]"
    ):
        run_recipe("finetune_classification", settings, tmp_path)


def test_lora_target_matching_nothing_fails_at_start(assets, tmp_path):
    settings = clm_settings(
        assets,
        tmp_path / "out",
        train_parameters="lora",
        lora={"target_modules": ["q_proj", "query"], "target_parameters": ["mlp.experts.w9.weight"]},
    )
    with pytest.raises(
        ValueError,
        match=r"LoRA targets match nothing in the model: lora.target_modules \['query'\], "
        r"lora.target_parameters \['mlp.experts.w9.weight'\]",
    ):
        run_recipe("finetune_clm", settings, tmp_path)
    assert not (tmp_path / "out" / "metrics.jsonl").exists(), "nothing may run before the check"


def test_dense_checkpoint_without_upcycle_section_fails(assets, tmp_path):
    settings = clm_settings(assets, tmp_path / "out", model_name_or_path=assets["dense"])
    with pytest.raises(ValueError, match=r"is a dense 'llama' checkpoint: add an `upcycle` section"):
        run_recipe("finetune_clm", settings, tmp_path)


def test_option_the_architecture_lacks_fails(assets, tmp_path):
    settings = clm_settings(
        assets,
        tmp_path / "out",
        model_name_or_path=assets["dense"],
        upcycle={"routing": "expert_choice", "num_experts": 4},
        router_aux_loss_coef=0.01,
    )
    with pytest.raises(ValueError, match=r"router_aux_loss_coef.*routing 'expert_choice'"):
        run_recipe("finetune_clm", settings, tmp_path)
