"""Each training option changes what it should (recipes run in-process with plain python, tiny models)."""

import json
import math
from pathlib import Path

import pytest
import torch
from recipe_helpers import classification_settings, clm_settings, load_recipe, run_recipe, train_records
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import hf_moe
from hf_moe.training import CausalLMConfig, load_model_for_finetuning, load_train_and_validation, tokenize_for_causal_lm


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
    assert (
        "backbone.model.layers.0.self_attn.q_proj.weight" in changed
        and "backbone.model.layers.1.mlp.router.weight" not in changed
    )


def test_only_routers_changes_only_router_weights(assets, tmp_path):
    run_recipe(
        "finetune_clm", clm_settings(assets, tmp_path / "out", train_parameters="routers", max_steps=3), tmp_path
    )
    before, after = weights(assets["switch"]), weights(tmp_path / "out")
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed == ["backbone.model.layers.1.mlp.router.weight"]


@pytest.mark.parametrize(
    "coefficient, term", [("router_z_loss_coef", "train/z_loss"), ("router_aux_loss_coef", "train/aux_loss")]
)
def test_routing_loss_coefficient_adds_exactly_the_logged_term(assets, tmp_path, coefficient, term):
    common = {
        "max_steps": 1,
        "eval_at_start": False,
        "eval_steps": 0,
        "router_z_loss_coef": 0.0,
        "router_aux_loss_coef": 0.0,
    }
    run_recipe("finetune_clm", clm_settings(assets, tmp_path / "off", **common), tmp_path)
    run_recipe("finetune_clm", clm_settings(assets, tmp_path / "on", **{**common, coefficient: 0.5}), tmp_path)
    off, on = train_records(tmp_path / "off")[0], train_records(tmp_path / "on")[0]
    assert on[term] == pytest.approx(off[term], rel=1e-6) and on[term] > 0.5
    assert on["train/loss"] - off["train/loss"] == pytest.approx(0.5 * on[term], abs=1e-5)
    assert on["train/task_loss"] == pytest.approx(off["train/task_loss"], abs=1e-5)


def test_expert_dropout_is_active_in_training_and_inactive_in_eval(assets):
    config = CausalLMConfig(model_name_or_path=assets["switch"], output_dir="-", dataset_name="-", expert_dropout=0.4)
    model = load_model_for_finetuning(config, AutoModelForCausalLM)
    dropouts = [m.input_dropout for m in model.modules() if getattr(m, "input_dropout", None) is not None]
    assert [d.p for d in dropouts] == [0.4] and model.config.expert_dropout == 0.4
    inputs = torch.randint(0, 200, (2, 12))
    model.train()
    assert not torch.equal(model(input_ids=inputs).logits, model(input_ids=inputs).logits)
    model.eval()
    assert torch.equal(model(input_ids=inputs).logits, model(input_ids=inputs).logits)
    plain = load_model_for_finetuning(
        CausalLMConfig(model_name_or_path=assets["switch"], output_dir="-", dataset_name="-"), AutoModelForCausalLM
    )
    plain.train()
    assert torch.equal(plain(input_ids=inputs).logits, plain(input_ids=inputs).logits), (
        "no dropout anywhere without the option"
    )


def test_backbone_dropout_and_capacity_factors_reach_the_modules(assets):
    config = CausalLMConfig(
        model_name_or_path=assets["switch"],
        output_dir="-",
        dataset_name="-",
        backbone_dropout=0.1,
        capacity_factor=0.5,
        eval_capacity_factor=2.0,
        router_jitter_noise=0.01,
    )
    model = load_model_for_finetuning(config, AutoModelForCausalLM)
    assert model.config.text_config.attention_dropout == 0.1
    assert all(layer.self_attn.attention_dropout == 0.1 for layer in model.backbone.model.layers)
    router = model.moe_blocks()[0].router
    assert (router.capacity_factor, router.eval_capacity_factor, router.jitter_noise) == (0.5, 2.0, 0.01)


def test_capacity_factor_drops_tokens_in_training_and_eval(assets, tmp_path):
    run_recipe(
        "finetune_clm",
        clm_settings(assets, tmp_path / "out", capacity_factor=0.5, eval_capacity_factor=0.5, max_steps=2),
        tmp_path,
    )
    assert all(r["train/dropped_fraction"] >= 0.4 for r in train_records(tmp_path / "out"))
    evaluations = json.loads((tmp_path / "out" / "evaluations.json").read_text())
    assert evaluations["routing"]["dropped_fraction"][0] >= 0.4
    run_recipe(
        "finetune_clm", clm_settings(assets, tmp_path / "dropless", capacity_factor="dropless", max_steps=2), tmp_path
    )
    assert all(r["train/dropped_fraction"] == 0 for r in train_records(tmp_path / "dropless"))


def test_lora_on_attention_and_experts_saves_a_loadable_adapter(assets, tmp_path):
    lora = {
        "r": 4,
        "alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "target_parameters": ["mlp.experts.down_proj.weight"],
    }
    run_recipe(
        "finetune_clm",
        clm_settings(assets, tmp_path / "out", train_parameters="lora", lora=lora, max_steps=3),
        tmp_path,
    )
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
    lora = {"r": 4, "alpha": 8, "target_parameters": ["mlp.experts.down_proj.weight"], "merge": True}
    run_recipe(
        "finetune_clm",
        clm_settings(assets, tmp_path / "out", train_parameters="lora", lora=lora, max_steps=3),
        tmp_path,
    )
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
        upcycle={"routing": "switch", "num_experts": 4, "num_experts_per_tok": 2},
        lora={"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.up_proj.weight"]},
    )
    run_recipe("finetune_clm", settings, tmp_path)
    base = tmp_path / "out" / "base_model"
    assert json.loads((base / "config.json").read_text())["num_experts"] == 4
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.model_type == "switch_moe"


def test_upcycled_step0_evaluation_equals_the_dense_model(assets, tmp_path):
    settings = clm_settings(
        assets,
        tmp_path / "out",
        model_name_or_path=assets["dense"],
        max_steps=1,
        eval_steps=0,
        upcycle={"routing": "switch", "num_experts": 4, "num_experts_per_tok": 2},
    )
    result = run_recipe("finetune_clm", settings, tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(assets["dense"]).eval()
    upcycled_step0 = result["history"][0]
    assert upcycled_step0["step"] == 0
    # Dense loss on the same validation blocks, through the same metric.
    config = CausalLMConfig(
        **{k: v for k, v in settings.items() if k in CausalLMConfig.__dataclass_fields__ and k != "upcycle"}
    )
    tokenizer = AutoTokenizer.from_pretrained(assets["dense"])
    data = tokenize_for_causal_lm(load_train_and_validation(config), tokenizer, config)
    ids = torch.tensor(data["validation"]["input_ids"])
    nll, tokens = load_recipe("finetune_clm").sequence_nll(dense(input_ids=ids).logits, ids)
    assert upcycled_step0["validation"]["loss"] == pytest.approx((nll.sum() / tokens.sum()).item(), rel=1e-5)


def test_expert_choice_upcycle_trains(assets, tmp_path):
    settings = clm_settings(
        assets,
        tmp_path / "out",
        model_name_or_path=assets["dense"],
        max_steps=3,
        upcycle={"routing": "expert_choice", "num_experts": 4},
    )
    result = run_recipe("finetune_clm", settings, tmp_path)
    assert result["history"][-1]["routing"]["aux_loss"] is None
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.model_type == "expert_choice_moe"


def test_gradient_accumulation_matches_the_larger_batch(assets, tmp_path):
    common = {"router_aux_loss_coef": 0.0, "max_steps": 3, "eval_steps": 0, "eval_at_start": False}
    run_recipe(
        "finetune_clm", clm_settings(assets, tmp_path / "big", per_device_train_batch_size=8, **common), tmp_path
    )
    run_recipe(
        "finetune_clm",
        clm_settings(assets, tmp_path / "acc", per_device_train_batch_size=4, gradient_accumulation_steps=2, **common),
        tmp_path,
    )
    big, accumulated = weights(tmp_path / "big"), weights(tmp_path / "acc")
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=2e-5, rtol=1e-4, msg=name)
    assert [r["train/loss"] for r in train_records(tmp_path / "acc")] == pytest.approx(
        [r["train/loss"] for r in train_records(tmp_path / "big")], abs=1e-5
    )


def test_warmup_and_linear_schedule(assets, tmp_path):
    run_recipe(
        "finetune_clm",
        clm_settings(assets, tmp_path / "out", learning_rate=1e-3, warmup_steps=4, max_steps=8, eval_steps=0),
        tmp_path,
    )
    rates = [r["train/lr"] for r in train_records(tmp_path / "out")]
    # lr after step k: k/4 of the peak while warming up, then linear decay to 0 at step 8.
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0], abs=1e-9)


def test_weight_decay_is_decoupled_and_skips_vectors(assets, tmp_path):
    common = {"max_steps": 1, "eval_steps": 0, "eval_at_start": False, "learning_rate": 1e-3}
    run_recipe("finetune_clm", clm_settings(assets, tmp_path / "plain", **common), tmp_path)
    run_recipe("finetune_clm", clm_settings(assets, tmp_path / "decay", weight_decay=0.5, **common), tmp_path)
    start, plain, decay = weights(assets["switch"]), weights(tmp_path / "plain"), weights(tmp_path / "decay")
    for name in start:
        if start[name].dim() >= 2:  # AdamW: w <- w - lr * wd * w, on top of the same Adam update
            torch.testing.assert_close(
                decay[name], plain[name] - 1e-3 * 0.5 * start[name], atol=1e-7, rtol=1e-5, msg=name
            )
        else:
            assert torch.equal(decay[name], plain[name]), name


def test_epochs_set_the_number_of_steps(assets, tmp_path):
    settings = clm_settings(
        assets, tmp_path / "out", max_steps=-1, num_train_epochs=1.5, eval_steps=0, max_train_samples=40
    )
    result = run_recipe("finetune_clm", settings, tmp_path)
    config = CausalLMConfig(**{k: v for k, v in settings.items() if k in CausalLMConfig.__dataclass_fields__})
    blocks = len(
        tokenize_for_causal_lm(
            load_train_and_validation(config), AutoTokenizer.from_pretrained(assets["switch"]), config
        )["train"]
    )
    expected = math.ceil(1.5 * math.ceil(blocks / 4))  # 1.5 epochs of batches of 4
    assert result["history"][-1]["step"] == expected == len(train_records(tmp_path / "out"))


def test_early_stopping_on_the_validation_metric(assets, tmp_path):
    settings = clm_settings(
        assets, tmp_path / "out", max_steps=20, eval_steps=2, early_stopping_patience=2, early_stopping_threshold=100.0
    )
    result = run_recipe("finetune_clm", settings, tmp_path)
    # Evaluations at steps 0, 2, 4: no improvement by 100 after step 0, so it stops after the second miss.
    assert [row["step"] for row in result["history"]] == [0, 2, 4]
    assert result["best"]["step"] == 0 and len(train_records(tmp_path / "out")) == 4


def test_gradient_checkpointing_gives_the_same_losses(assets, tmp_path):
    common = {"max_steps": 2, "eval_steps": 0, "eval_at_start": False}
    run_recipe("finetune_clm", clm_settings(assets, tmp_path / "plain", **common), tmp_path)
    run_recipe("finetune_clm", clm_settings(assets, tmp_path / "ckpt", gradient_checkpointing=True, **common), tmp_path)
    plain, ckpt = train_records(tmp_path / "plain"), train_records(tmp_path / "ckpt")
    for a, b in zip(plain, ckpt, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)
        assert b["train/z_loss"] == pytest.approx(a["train/z_loss"], abs=1e-5), "router losses survive recomputation"


def test_seed_makes_runs_repeatable(assets, tmp_path):
    common = {"max_steps": 2, "eval_steps": 0, "eval_at_start": False, "expert_dropout": 0.4}
    run_recipe("finetune_clm", clm_settings(assets, tmp_path / "a", **common), tmp_path)
    run_recipe("finetune_clm", clm_settings(assets, tmp_path / "b", **common), tmp_path)
    run_recipe("finetune_clm", clm_settings(assets, tmp_path / "c", seed=1, **common), tmp_path)
    a, b, c = (weights(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


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
        eval_steps=0,
    )
    result = run_recipe("finetune_clm", settings, tmp_path)
    assert result["history"][-1]["validation"]["loss"] > 0


def test_classification_only_non_moe_with_lora_head(assets, tmp_path):
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    run_recipe(
        "finetune_classification",
        classification_settings(assets, tmp_path / "out", train_parameters="lora", lora=lora),
        tmp_path,
    )
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert any(".score." in n for n in adapter), "the new head is trained and saved with the adapter"
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_push_to_hub_offline_saves_locally_and_says_how_to_push(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_recipe(
        "finetune_clm",
        clm_settings(
            assets, tmp_path / "out", max_steps=1, eval_steps=0, push_to_hub=True, hub_model_id="me/tiny-switch"
        ),
        tmp_path,
    )
    printed = capsys.readouterr().out
    folder = str((tmp_path / "out").resolve())
    assert "Could not push to the Hub" in printed and f"saved locally in {folder}" in printed
    assert f"hf upload me/tiny-switch {folder}" in printed
    assert (tmp_path / "out" / "model.safetensors").is_file()
