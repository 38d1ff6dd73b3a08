"""Each hf_moe option of the recipes changes what it should (recipes run in-process, tiny models)."""

import json
from pathlib import Path

import pytest
import torch
from recipe_helpers import classification_settings, clm_settings, eval_records, run_recipe, train_records
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_moe
from hf_moe.training import MoeArguments
from hf_moe.training.model_loading import load_model_for_finetuning

UPCYCLE = {"upcycle": {"routing": "switch", "num_experts": 4}, "num_experts_per_tok": 2}


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def is_moe(name: str) -> bool:
    return ".router." in name or ".experts." in name


def test_only_non_moe_leaves_every_router_and_expert_unchanged(assets, tmp_path):
    run_recipe(
        "finetune_clm", clm_settings(assets, tmp_path / "out", train_parameters="non_moe", max_steps=3), tmp_path
    )
    before, after = weights(assets["switch"]), weights(tmp_path / "out")
    moe_names = [n for n in before if is_moe(n)]
    assert len(moe_names) == 4  # router + gate/up/down experts of the one MoE layer
    for name in moe_names:
        assert torch.equal(before[name], after[name]), name
    changed = [n for n in before if not is_moe(n) and not torch.equal(before[n], after[n])]
    assert "backbone.model.layers.0.self_attn.q_proj.weight" in changed


def test_only_routers_changes_only_router_weights(assets, tmp_path):
    run_recipe(
        "finetune_clm", clm_settings(assets, tmp_path / "out", train_parameters="routers", max_steps=3), tmp_path
    )
    before, after = weights(assets["switch"]), weights(tmp_path / "out")
    assert sorted(n for n in before if not torch.equal(before[n], after[n])) == [
        "backbone.model.layers.1.mlp.router.weight"
    ]


@pytest.mark.parametrize("coefficient, term", [("router_z_loss_coef", "z_loss"), ("router_aux_loss_coef", "aux_loss")])
def test_routing_loss_coefficient_adds_exactly_the_logged_term(assets, tmp_path, coefficient, term):
    common = {"max_steps": 1, "eval_strategy": "no", "eval_on_start": False}
    common |= {"router_z_loss_coef": 0.0, "router_aux_loss_coef": 0.0}
    run_recipe("finetune_clm", clm_settings(assets, tmp_path / "off", **common), tmp_path)
    run_recipe("finetune_clm", clm_settings(assets, tmp_path / "on", **{**common, coefficient: 0.5}), tmp_path)
    off, on = train_records(tmp_path / "off")[0], train_records(tmp_path / "on")[0]
    assert on[term] == pytest.approx(off[term], rel=1e-6) and on[term] > 0.5
    assert on["loss"] - off["loss"] == pytest.approx(0.5 * on[term], abs=1e-5)
    assert on["task_loss"] == pytest.approx(off["task_loss"], abs=1e-5)


def test_expert_dropout_is_active_in_training_and_inactive_in_eval(assets):
    model = load_model_for_finetuning(
        MoeArguments(model_name_or_path=assets["switch"], expert_dropout=0.4), AutoModelForCausalLM
    )
    dropouts = [m.input_dropout for m in model.modules() if getattr(m, "input_dropout", None) is not None]
    assert [d.p for d in dropouts] == [0.4] and model.config.expert_dropout == 0.4
    inputs = torch.randint(0, 200, (2, 12))
    model.train()
    assert not torch.equal(model(input_ids=inputs).logits, model(input_ids=inputs).logits)
    model.eval()
    assert torch.equal(model(input_ids=inputs).logits, model(input_ids=inputs).logits)


def test_backbone_dropout_and_capacity_factors_reach_the_modules(assets):
    options = MoeArguments(
        model_name_or_path=assets["switch"],
        backbone_dropout=0.1,
        capacity_factor="0.5",
        eval_capacity_factor="2.0",
        router_jitter_noise=0.01,
    )
    model = load_model_for_finetuning(options, AutoModelForCausalLM)
    assert all(layer.self_attn.attention_dropout == 0.1 for layer in model.backbone.model.layers)
    router = model.moe_blocks()[0].router
    assert (router.capacity_factor, router.eval_capacity_factor, router.jitter_noise) == (0.5, 2.0, 0.01)


def test_capacity_factor_drops_tokens_in_training_and_eval(assets, tmp_path):
    settings = clm_settings(assets, tmp_path / "out", capacity_factor="0.5", eval_capacity_factor="0.5", max_steps=2)
    run_recipe("finetune_clm", settings, tmp_path)
    assert all(r["router/layer1/dropped_fraction"] >= 0.4 for r in train_records(tmp_path / "out"))
    assert eval_records(tmp_path / "out")[-1]["eval_validation_router/layer1/dropped_fraction"] >= 0.4
    evaluations = json.loads((tmp_path / "out" / "evaluations.json").read_text())
    assert evaluations["routing"]["dropped_fraction"][0] >= 0.4
    settings = clm_settings(assets, tmp_path / "dropless", capacity_factor="dropless", max_steps=2)
    run_recipe("finetune_clm", settings, tmp_path)
    assert all(r["router/layer1/dropped_fraction"] == 0 for r in train_records(tmp_path / "dropless"))


def test_lora_on_attention_and_experts_saves_a_loadable_adapter(assets, tmp_path):
    lora = {"lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"]}
    lora["lora_target_parameters"] = ["mlp.experts.down_proj.weight"]
    settings = clm_settings(assets, tmp_path / "out", train_parameters="lora", max_steps=3, **lora)
    run_recipe("finetune_clm", settings, tmp_path)
    out = tmp_path / "out"
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("q_proj.lora_A" in n for n in adapter) and any("experts.down_proj" in n and "lora" in n for n in adapter)
    assert not (out / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out)  # transformers' PEFT integration loads base + adapter
    base = AutoModelForCausalLM.from_pretrained(assets["switch"])
    inputs = torch.randint(0, 200, (1, 10))
    assert not torch.allclose(model(input_ids=inputs).logits, base(input_ids=inputs).logits)
    card = (out / "README.md").read_text()
    assert "LoRA adapter" in card and "library_name: peft" in card


def test_lora_merge_saves_a_full_model_with_changed_experts(assets, tmp_path):
    lora = {"lora_r": 4, "lora_alpha": 8, "lora_target_parameters": ["mlp.experts.down_proj.weight"]}
    settings = clm_settings(assets, tmp_path / "out", train_parameters="lora", lora_merge=True, max_steps=3, **lora)
    run_recipe("finetune_clm", settings, tmp_path)
    before, after = weights(assets["switch"]), weights(tmp_path / "out")
    assert sorted(before) == sorted(after), "merged model has the base model's parameter names"
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed == ["backbone.model.layers.1.mlp.experts.down_proj.weight"]
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), hf_moe.SwitchMoeForCausalLM)


def test_upcycled_on_the_fly_with_lora_saves_its_base(assets, tmp_path):
    settings = clm_settings(
        assets,
        tmp_path / "out",
        model_name_or_path=assets["dense"],
        train_parameters="lora",
        max_steps=2,
        lora_target_modules=["q_proj"],
        lora_target_parameters=["mlp.experts.up_proj.weight"],
        **UPCYCLE,
    )
    run_recipe("finetune_clm", settings, tmp_path)
    base = tmp_path / "out" / "base_model"
    assert json.loads((base / "config.json").read_text())["num_experts"] == 4
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.model_type == "switch_moe"


def test_upcycled_step0_evaluation_equals_the_dense_control(assets, tmp_path):
    """Copies with renormalised top-2 and dropless evaluation: the upcycled model at step 0 is the dense model,
    so its step-0 validation task loss equals the dense control's, evaluated the same way."""
    common = {"model_name_or_path": assets["dense"], "max_steps": 2, "eval_steps": 2, **UPCYCLE}
    moe = run_recipe("finetune_clm", clm_settings(assets, tmp_path / "moe", **common), tmp_path)
    dense = run_recipe("finetune_clm", clm_settings(assets, tmp_path / "dense", dense_control=True, **common), tmp_path)
    assert moe["history"][0]["validation"]["loss"] == pytest.approx(dense["history"][0]["validation"]["loss"], rel=1e-5)
    assert [row["step"] for row in dense["history"]] == [row["step"] for row in moe["history"]] == [0, 2]
    # The dense control is the dense model, timed the same way.
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "dense").config.model_type == "llama"
    for run in ("moe", "dense"):
        rows = train_records(tmp_path / run)
        assert all(r["step_seconds"] > 0 and r["step_cpu_seconds"] > 0 and r["tokens_per_second"] > 0 for r in rows), (
            run
        )
    assert "z_loss" not in train_records(tmp_path / "dense")[0]


def test_dense_control_needs_the_upcycling_settings(assets, tmp_path):
    with pytest.raises(ValueError, match="dense_control fine-tunes the dense model an MoE run upcycles"):
        run_recipe("finetune_clm", clm_settings(assets, tmp_path / "out", dense_control=True), tmp_path)


def test_expert_choice_upcycle_trains(assets, tmp_path):
    settings = clm_settings(
        assets,
        tmp_path / "out",
        model_name_or_path=assets["dense"],
        max_steps=3,
        upcycle={"routing": "expert_choice", "num_experts": 4},
    )
    result = run_recipe("finetune_clm", settings, tmp_path)
    assert "eval_validation_aux_loss" not in eval_records(tmp_path / "out")[-1]
    assert result["history"][-1]["validation"]["loss"] < result["history"][0]["validation"]["loss"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.model_type == "expert_choice_moe"


def test_early_stopping_on_the_validation_metric(assets, tmp_path):
    settings = clm_settings(
        assets, tmp_path / "out", max_steps=20, eval_steps=2, early_stopping_patience=2, early_stopping_threshold=100.0
    )
    result = run_recipe("finetune_clm", settings, tmp_path)
    # Trainer's best metric starts at the first evaluation after step 0 (step 2); no improvement by 100
    # at steps 4 and 6, so it stops there, after the second miss.
    assert [row["step"] for row in result["history"]] == [0, 2, 4, 6]
    assert len(train_records(tmp_path / "out")) == 6


def test_instruction_data_trains_on_responses(assets, tmp_path):
    settings = clm_settings(
        assets,
        tmp_path / "out",
        train_file=str(assets["root"] / "instructions.jsonl"),
        validation_file=None,
        prompt_column="prompt",
        response_column="response",
        packing=False,
        max_steps=2,
    )
    result = run_recipe("finetune_clm", settings, tmp_path)
    assert result["history"][-1]["validation"]["loss"] > 0


def test_classification_lora_trains_and_saves_the_new_head(assets, tmp_path):
    settings = classification_settings(
        assets, tmp_path / "out", train_parameters="lora", lora_r=4, lora_target_modules=["q_proj", "v_proj"]
    )
    run_recipe("finetune_classification", settings, tmp_path)
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert any(".score." in n for n in adapter), "the new head is trained and saved with the adapter"
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert model.config.text_config.id2label == {0: "negative", 1: "positive"}


def test_push_to_hub_offline_saves_locally_and_says_how_to_push(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = clm_settings(assets, tmp_path / "out", max_steps=1, push_to_hub=True, hub_model_id="me/tiny-switch")
    run_recipe("finetune_clm", settings, tmp_path)
    printed = capsys.readouterr().out
    folder = str((tmp_path / "out").resolve())
    assert "Could not push to the Hub" in printed and f"saved locally in {folder}" in printed
    assert f"hf upload me/tiny-switch {folder}" in printed
    assert (tmp_path / "out" / "model.safetensors").is_file()
