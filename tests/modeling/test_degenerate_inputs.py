"""Degenerate batches and checkpoints whose config does not describe their weights."""

import json

import pytest
import torch
from backbones import VOCAB, dense_config
from transformers import AutoModelForCausalLM

import hf_moe


def causal_lm(routing="switch", **overrides):
    config_class = hf_moe.SwitchMoeConfig if routing == "switch" else hf_moe.ExpertChoiceMoeConfig
    config = config_class(text_config=dense_config("llama"), num_experts=4, moe_layers=[1, 3], **overrides)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("routing", ["switch", "expert_choice"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_an_all_padding_batch_gives_finite_losses_and_zero_router_terms(routing, training):
    model = causal_lm(routing).train(training)
    ids = torch.randint(3, VOCAB, (2, 6))
    out = model(ids, attention_mask=torch.zeros_like(ids), labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and out.z_loss.item() == 0.0
    assert out.aux_loss is None if routing == "expert_choice" else out.aux_loss.item() == 0.0
    assert torch.equal(out.dropped_fraction, torch.zeros(2))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_batch_with_targets_keeps_its_task_loss():
    model = causal_lm().eval()
    ids = torch.randint(3, VOCAB, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[0, 3] = ids[0, 3]  # one target token is enough
    out = model(ids, labels=labels)
    task = torch.nn.functional.cross_entropy(out.logits[0, 2], ids[0, 3])
    torch.testing.assert_close(out.loss, task + 0.001 * out.z_loss + 0.01 * out.aux_loss)


@pytest.fixture
def saved(tmp_path):
    model = causal_lm()
    model.save_pretrained(tmp_path)
    return tmp_path


def edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_moe_layers_that_differ_from_the_weights_are_an_error(saved):
    edit_config(saved, moe_layers=[0, 1])
    message = (
        r"config does not match its weights: config moe_layers=\[0, 1\], but the weights have MoE blocks in "
        r"layers \[1, 3\]"
    )
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(saved)


def test_num_experts_that_differs_from_the_weights_is_an_error(saved):
    edit_config(saved, num_experts=8)
    message = r"config num_experts=8, but the weights have 4 experts \(backbone\.model\.layers\.1\.mlp\.experts\."
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(saved)


def test_a_matching_checkpoint_loads_and_reports_loading_info_on_request(saved):
    model, info = AutoModelForCausalLM.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert AutoModelForCausalLM.from_pretrained(saved).config.moe_layers == [1, 3]


def test_other_size_mismatches_stay_errors_unless_ignored(saved):
    config = json.loads((saved / "config.json").read_text())
    edit_config(saved, text_config={**config["text_config"], "vocab_size": VOCAB + 8})
    with pytest.raises(RuntimeError, match=r"do not fit the model's shapes: \['backbone\.lm_head\.weight'"):
        AutoModelForCausalLM.from_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved, ignore_mismatched_sizes=True)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 8
