"""The shared expert of `MoeBlock` (DeepSeekMoE; Qwen2-MoE's gated ``shared_expert``): built from the dense
MLP's own class at its own width, added for every non-padding token, saved, loaded and loaded as remote code."""

import sys

import pytest
import torch
from backbones import BACKBONES, VOCAB, dense_config
from test_remote_code import check_loaded, load_in_clean_process
from transformers import AutoModelForCausalLM

import hf_moe
from hf_moe import SwitchMoeConfig, SwitchMoeForCausalLM

SHARED = 24  # neurons of the shared expert; the dense MLPs have 64 (GPT-2: 128)


def shared_config(model_type: str, gate: bool, **overrides) -> SwitchMoeConfig:
    return SwitchMoeConfig(
        text_config=dense_config(model_type),
        num_experts=4,
        num_experts_per_tok=2,
        shared_expert_intermediate_size=SHARED,
        shared_expert_gate=gate,
        **overrides,
    )


def randomised(model):
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    return model.eval()


@pytest.mark.parametrize("gate", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("model_type", list(BACKBONES))
def test_block_adds_the_shared_expert_to_the_routed_output(model_type, gate, tmp_path):
    model = randomised(SwitchMoeForCausalLM(shared_config(model_type, gate)))
    block = model.moe_blocks()[0]
    dense_class = type(block.experts).__mro__[2]  # GroupedExperts in front of the dense MLP class
    assert type(block.shared_expert) is dense_class  # the dense MLP's own module type
    widths = {p.shape[i] for p in block.shared_expert.parameters() for i in range(p.dim()) if p.shape[i] == SHARED}
    assert widths == {SHARED}
    assert (block.shared_expert_gate is not None) == gate

    hidden = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    block.token_mask = mask
    shared_expert = block.shared_expert
    with torch.no_grad():
        out = block(hidden)
        shared = shared_expert(hidden)
        if gate:
            shared = torch.sigmoid(block.shared_expert_gate(hidden)) * shared
        block.shared_expert = None
        routed = block(hidden)
    block.shared_expert, block.token_mask = shared_expert, None
    assert shared[mask].abs().max() > 1e-3  # the comparison is not vacuous
    torch.testing.assert_close(out[mask], (routed + shared)[mask], rtol=0, atol=1e-6)
    assert not out[~mask].any()  # padding gets 0 from the shared expert too

    # Save and load: the same function, the shared expert's tensors under Qwen2-MoE's names.
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    names = [n for n in loaded.state_dict() if ".shared_expert" in n]
    assert names and all(".shared_expert." in n or n.endswith(".shared_expert_gate.weight") for n in names)
    assert any(n.endswith("shared_expert_gate.weight") for n in names) == gate
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_routing_losses_and_statistics_concern_the_routed_experts_only():
    # One MoE layer, the last: its router sees the same input with and without the shared expert.
    with_shared = randomised(SwitchMoeForCausalLM(shared_config("llama", True, moe_layers=[3])))
    plain = SwitchMoeForCausalLM(
        SwitchMoeConfig(text_config=dense_config("llama"), num_experts=4, num_experts_per_tok=2, moe_layers=[3])
    )
    missing = plain.load_state_dict(with_shared.state_dict(), strict=False)
    assert not missing.missing_keys and all(".shared_expert" in k for k in missing.unexpected_keys)
    plain.eval()
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        a, b = with_shared(ids, labels=ids), plain(ids, labels=ids)
    assert not torch.equal(a.logits, b.logits)  # the shared expert does contribute
    for name in ("aux_loss", "z_loss", "expert_load", "dropped_fraction"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def test_config_validates_the_shared_expert_fields():
    with pytest.raises(ValueError) as error:
        SwitchMoeConfig(text_config=dense_config("llama"), shared_expert_intermediate_size=-1)
    assert "shared_expert_intermediate_size must be an integer >= 0 or None (no shared expert), got -1" in str(
        error.value
    )
    with pytest.raises(ValueError, match=r"shared_expert_gate=True needs a shared expert .* got None"):
        SwitchMoeConfig(text_config=dense_config("llama"), shared_expert_gate=True)
    with pytest.raises(ValueError, match="shared_expert_gate must be True or False, got 'yes'"):
        SwitchMoeConfig(text_config=dense_config("llama"), shared_expert_intermediate_size=8, shared_expert_gate="yes")
    no_shared = SwitchMoeForCausalLM(
        SwitchMoeConfig(text_config=dense_config("llama"), shared_expert_intermediate_size=0)
    )
    assert all(block.shared_expert is None and block.shared_expert_gate is None for block in no_shared.moe_blocks())


def test_loading_weights_without_the_configured_shared_expert_is_an_error(tmp_path):
    SwitchMoeForCausalLM(SwitchMoeConfig(text_config=dense_config("llama"), num_experts=4)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"shared_expert_intermediate_size=24, shared_expert_gate=False, but the "
                       r"weights lack backbone\.model\.layers\.1\.mlp\.shared_expert"):  # fmt: skip
        SwitchMoeForCausalLM.from_pretrained(tmp_path, shared_expert_intermediate_size=SHARED)


def test_checkpoint_with_a_shared_expert_loads_as_remote_code(tmp_path):
    # GPT-2: Conv1D layers, whose narrowed copies keep their orientation.
    model = randomised(AutoModelForCausalLM.from_config(shared_config("gpt2", True)))
    model.save_pretrained(tmp_path / "checkpoint")
    check_loaded(
        load_in_clean_process(sys.executable, tmp_path / "checkpoint", tmp_path), model, hf_moe.SwitchMoeConfig
    )
