"""Outputs follow what the installed transformers declares: the backbone's own output class plus
the routing fields, so renamed or new backbone fields (the cache became ``cache`` in 5.24) pass
through without hf_moe naming them."""

from dataclasses import dataclass

import torch
from backbones import VOCAB, dense_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.utils import ModelOutput

import hf_moe
from hf_moe.modeling.modeling_moe import MoeModelOutput


def test_output_is_the_backbone_output_with_routing_fields():
    config = hf_moe.SwitchMoeConfig(text_config=dense_config("llama"), num_experts=4)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        dense_out = model.backbone(ids, use_cache=True)
        out = model(ids, use_cache=True)
    assert isinstance(out, type(dense_out)) and isinstance(out, MoeModelOutput)
    # Every field the backbone returned, under the backbone's own names (whatever the release
    # calls its cache), then the routing fields.
    assert list(out.keys()) == [*dense_out.keys(), "aux_loss", "z_loss", "expert_load", "dropped_fraction"]
    assert torch.equal(out.logits, dense_out.logits)


def test_a_field_hf_moe_does_not_know_passes_through():
    @dataclass
    class FutureOutput(ModelOutput):
        logits: torch.Tensor | None = None
        field_added_by_a_later_release: torch.Tensor | None = None

    config = hf_moe.ExpertChoiceMoeConfig(text_config=dense_config("qwen3", num_labels=3), num_experts=4)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    backbone_forward = model.backbone.forward

    def forward(*args, **kwargs):
        logits = backbone_forward(*args, **kwargs).logits
        return FutureOutput(logits=logits, field_added_by_a_later_release=torch.ones(1))

    model.backbone.forward = forward
    out = model(torch.randint(3, VOCAB, (2, 5)))
    assert type(out).__name__ == "MoeFutureOutput" and isinstance(out, FutureOutput)
    assert torch.equal(out.field_added_by_a_later_release, torch.ones(1))
    assert out.logits.shape == (2, 3) and out.z_loss is not None
    assert model(torch.randint(3, VOCAB, (2, 5)), return_dict=False)[1].item() == 1.0
