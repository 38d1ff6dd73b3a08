"""Every supported dense backbone, as both architectures: persistence, generation, attention
implementations, gradient checkpointing and bfloat16."""

import pytest
import torch
from backbones import BACKBONES, VOCAB, dense_config, learn_thresholds
from transformers import AutoModelForCausalLM

import hf_moe

ARCHITECTURES = {"switch": hf_moe.SwitchMoeConfig, "expert_choice": hf_moe.ExpertChoiceMoeConfig}


def moe_config(model_type, routing, **overrides):
    text_overrides = overrides.pop("text", {})
    return ARCHITECTURES[routing](
        text_config=dense_config(model_type, **text_overrides), num_experts=4, moe_layers=[1, 3], **overrides
    )


def batch(seq_len=10):
    ids = torch.randint(3, VOCAB, (2, seq_len))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second sequence
    return ids, mask


cases = pytest.mark.parametrize("routing", list(ARCHITECTURES))
backbones = pytest.mark.parametrize("model_type", list(BACKBONES))


@backbones
@cases
def test_save_load_round_trip(model_type, routing, tmp_path):
    model = AutoModelForCausalLM.from_config(moe_config(model_type, routing)).eval()
    ids, mask = batch()
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is type(model)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and not info["mismatched_keys"]
    torch.testing.assert_close(
        loaded.eval()(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, rtol=0, atol=1e-6
    )
    if model.config.text_config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


@backbones
@cases
def test_cached_greedy_generation_equals_full_forwards(model_type, routing):
    # Expert choice generates in its causal threshold mode, the default of the causal-LM head.
    model = AutoModelForCausalLM.from_config(moe_config(model_type, routing)).eval()
    if routing == "expert_choice":
        learn_thresholds(model)
    model.generation_config.eos_token_id = None  # compare all 6 steps, even past an end-of-text pick
    prompt = torch.randint(3, VOCAB, (1, 5))
    logits_shapes = []
    hook = model.register_forward_hook(lambda module, args, out: logits_shapes.append(tuple(out.logits.shape)))
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    hook.remove()
    # logits_to_keep: the prefill computes the last position's logits only, as every step does.
    assert logits_shapes == [(1, 1, VOCAB)] * 6
    expected = prompt
    with torch.no_grad():
        for _ in range(6):
            next_token = model(expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=1)
    assert torch.equal(generated, expected)


@backbones
@cases
def test_sdpa_and_eager_agree(model_type, routing):
    model = AutoModelForCausalLM.from_config(moe_config(model_type, routing), attn_implementation="eager").eval()
    ids, mask = batch()
    eager = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("sdpa")
    assert model.config.text_config._attn_implementation == "sdpa"
    sdpa = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(sdpa[real], eager[real], rtol=1e-4, atol=1e-5)


@backbones
@cases
def test_gradient_checkpointing_gives_the_same_gradients(model_type, routing):
    # Training capacity (switch) and jitter exercise routing that must replay identically.
    overrides = {"router_jitter_noise": 0.1, "capacity_factor": 1.0} if routing == "switch" else {}
    model = AutoModelForCausalLM.from_config(moe_config(model_type, routing, expert_dropout=0.2, **overrides)).train()
    ids, mask = batch()

    def gradients():
        torch.manual_seed(1)
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    thresholds = {n: b.clone() for n, b in model.named_buffers() if "score_thresholds" in n}
    plain = gradients()
    for n, b in model.named_buffers():  # the threshold EMA is updated by each step; start both runs alike
        if n in thresholds:
            b.copy_(thresholds[n])
    model.activation_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.backbone.modules())
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    assert any("experts" in n for n in plain) and any("router" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


@backbones
@cases
def test_bfloat16_forward_backward_routes_in_float32(model_type, routing):
    model = AutoModelForCausalLM.from_config(moe_config(model_type, routing), dtype=torch.bfloat16).train()
    assert model.backbone.dtype == torch.bfloat16
    ids, mask = batch()
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert out.logits.dtype == torch.bfloat16
    assert all(logits.dtype == torch.float32 for logits in out.router_logits)
    assert out.z_loss.dtype == torch.float32
    out.loss.backward()
    router_grads = [b.router.weight.grad for b in model.moe_blocks()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in router_grads)
