"""PEFT LoRA adapters of an Expert-Choice model reproduce the trained model after reload.

The router's score thresholds (buffers, updated by every training step, used by the causal
threshold routing) are state of the fine-tune. PEFT saves a module's parameters and buffers when it
is listed in ``modules_to_save``; listing ``"router"`` also trains the router in full (E x hidden
weights per MoE layer).
"""

import torch
from backbones import VOCAB, dense_config
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

import hf_moe


def fine_tune_and_reload(tmp_path, **lora):
    config = hf_moe.ExpertChoiceMoeConfig(text_config=dense_config("llama"), num_experts=4, moe_layers=[1, 3])
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    lora_config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], target_parameters=["mlp.experts.down_proj.weight"], **lora
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), lora_config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(4):
        ids = torch.randint(3, VOCAB, (4, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        return model, model(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits


def test_router_in_modules_to_save_keeps_the_thresholds_and_reload_is_exact(tmp_path):
    model, trained, reloaded = fine_tune_and_reload(tmp_path, modules_to_save=["router"])
    saved = get_peft_model_state_dict(model)
    thresholds = [k for k in saved if k.endswith("router.score_thresholds")]
    assert len(thresholds) == 2 and all((saved[k] > 0).all() for k in thresholds)  # learned, not the initial 0
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=0)


def test_without_the_router_in_modules_to_save_the_thresholds_are_lost(tmp_path):
    model, trained, reloaded = fine_tune_and_reload(tmp_path)
    assert not any("score_thresholds" in k for k in get_peft_model_state_dict(model))
    assert not torch.allclose(reloaded, trained, atol=1e-3)
