"""Experts narrower than the dense MLP (``moe_intermediate_size``) on every backbone and both architectures:
the grouped weights take that width, the model runs, saves and loads back the same."""

import pytest
import torch
from backbones import BACKBONES, VOCAB, dense_config
from transformers import AutoModelForCausalLM

import hf_moe
from hf_moe.modeling import find_feed_forward_blocks
from hf_moe.modeling.experts import mlp_intermediate_size

ARCHITECTURES = {"switch": hf_moe.SwitchMoeConfig, "expert_choice": hf_moe.ExpertChoiceMoeConfig}


@pytest.mark.parametrize("routing", list(ARCHITECTURES))
@pytest.mark.parametrize("model_type", list(BACKBONES))
def test_experts_take_moe_intermediate_size(model_type, routing, tmp_path):
    config = ARCHITECTURES[routing](
        text_config=dense_config(model_type), num_experts=4, moe_layers=[1, 3], moe_intermediate_size=8
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    hidden = config.text_config.hidden_size
    for block in model.moe_blocks():
        experts = block.experts
        # every weight indexed by intermediate neurons has 8 (a fused gate/up projection 2 * 8) of them
        widths = {m.out_features if m.out_features != hidden else m.in_features for m in experts.modules()
                  if isinstance(m, hf_moe.modeling.experts.GroupedLinear)}  # fmt: skip
        assert widths <= {8, 16} and 8 in widths
    dense_mlp = model.backbone.get_submodule(find_feed_forward_blocks(model.backbone, config.text_config)[0])
    assert mlp_intermediate_size(dense_mlp, hidden) == (64 if model_type != "gpt2" else 128)  # layer 0 stays dense
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.moe_intermediate_size == 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-6)
