"""The MoE block and its routers in isolation: dispatch, capacity, dropping, jitter, dropout."""

import math

import pytest
import torch
from backbones import dense_config
from transformers import AutoModelForCausalLM

import hf_moe
from hf_moe.modeling.modeling_moe import record_routing
from hf_moe.modeling.switch import fill_capacity_in_token_order


def switch_model(**overrides):
    config = hf_moe.SwitchMoeConfig(text_config=dense_config("llama"), num_experts=4, moe_layers=[1], **overrides)
    return AutoModelForCausalLM.from_config(config)


def first_block(model) -> hf_moe.MoeBlock:
    return model.moe_blocks()[0]


def routed(block: hf_moe.MoeBlock, hidden: torch.Tensor):
    """(output, routing record) of one call of ``block``."""
    with record_routing([block.router]) as records:
        out = block(hidden)
    return out, records[0]


def test_capacity_is_filled_in_token_order():
    # (sequences, seq_len, k): picks of two sequences, top-2
    picks = torch.randint(0, 3, (2, 9, 2))
    keep = fill_capacity_in_token_order(picks, num_experts=3, capacity=3)
    for seq in range(2):
        used = [0, 0, 0]
        for token in range(9):
            for choice in range(2):
                expert = picks[seq, token, choice].item()
                assert keep[seq, token, choice].item() == (used[expert] < 3)
                used[expert] += 1


def test_dropped_tokens_get_exactly_zero_output_and_kept_tokens_do_not():
    model = switch_model(capacity_factor=0.5).train()
    block = first_block(model)
    hidden = torch.randn(2, 16, 32)
    out, record = routed(block, hidden)
    capacity = math.ceil(0.5 * 16 * 1 / 4)
    assert block.router.capacity(16) == capacity
    processed = torch.zeros(32, dtype=torch.bool)
    processed[record.assignments.token_idx] = True
    assert 0 < processed.sum() < 32  # some tokens dropped, some kept
    rows = out.view(32, 32)
    assert (rows[~processed] == 0).all()
    assert (rows[processed].abs().sum(-1) > 0).all()
    per_expert = torch.bincount(record.assignments.expert_idx + 4 * (record.assignments.token_idx // 16), minlength=8)
    assert per_expert.max() <= capacity


def test_evaluation_is_dropless_unless_eval_capacity_factor_is_set():
    hidden = torch.randn(2, 16, 32)
    model = switch_model(capacity_factor=0.5).eval()
    assert routed(first_block(model), hidden)[1].assignments.token_idx.numel() == 32
    model = switch_model(capacity_factor=None, eval_capacity_factor=0.5).eval()
    assert routed(first_block(model), hidden)[1].assignments.token_idx.numel() < 32


def test_padding_tokens_get_no_assignment_and_take_no_capacity():
    model = switch_model(capacity_factor=1.0).train()
    block = first_block(model)
    hidden = torch.randn(1, 12, 32)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, :4] = False  # left padding would otherwise fill the capacity first
    block.token_mask = mask
    record = routed(block, hidden)[1]
    token_idx = record.assignments.token_idx
    assert token_idx.min() >= 4
    ranks = fill_capacity_in_token_order(record.top_experts[4:].view(1, 8, 1), 4, block.router.capacity(12))
    assert token_idx.numel() == ranks.sum()


def test_top1_without_renormalisation_scales_the_expert_output_by_the_gate():
    # Switch eq. 2: y = p_max(x) * E(x); with equal experts, y = p_max(x) * F(x) (docs/moe-reference.md).
    model = switch_model(capacity_factor=None).eval()
    block = first_block(model)
    dense = AutoModelForCausalLM.from_config(dense_config("llama")).model.layers[1].mlp
    for name, param in dense.named_parameters():
        block.experts.get_parameter(name).data.copy_(param.data.expand_as(block.experts.get_parameter(name)))
    hidden = torch.randn(2, 8, 32)
    gate = (hidden @ block.router.weight.T).softmax(-1).max(-1).values
    torch.testing.assert_close(block(hidden), gate[..., None] * dense(hidden), rtol=1e-5, atol=1e-6)
    assert gate.max() < 0.5  # a raw top-1 gate near 1/E: this is not the dense function


def test_jitter_multiplies_only_the_router_input_and_only_in_training():
    model = switch_model(router_jitter_noise=0.2, capacity_factor=None)
    block = first_block(model)
    seen = []
    block.experts.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    hidden = torch.randn(1, 8, 32)
    plain_logits = hidden.view(8, 32) @ block.router.weight.T

    model.train()
    record = routed(block, hidden)[1]
    assert not torch.allclose(record.router_logits, plain_logits)  # the router saw jittered input
    torch.testing.assert_close(seen[-1], hidden.view(8, 32)[record.assignments.token_idx])  # one row per pair

    model.eval()
    torch.testing.assert_close(routed(block, hidden)[1].router_logits, plain_logits)


def test_expert_dropout_acts_on_the_output_projection_input_in_training_only():
    model = switch_model(expert_dropout=0.5, capacity_factor=None)
    block = first_block(model)
    assert block.experts.down_proj.input_dropout.p == 0.5
    assert block.experts.gate_proj.input_dropout is None and block.experts.up_proj.input_dropout is None
    hidden = torch.randn(1, 8, 32)
    model.eval()
    first, second = block(hidden), block(hidden)
    assert torch.equal(first, second)
    reference = switch_model(expert_dropout=0.0, capacity_factor=None).eval()
    reference.load_state_dict(model.state_dict())
    assert torch.equal(first_block(reference)(hidden), first)
    model.train()
    assert not torch.allclose(block(hidden), first)


def test_router_initialisation_and_expert_initialisation_follow_the_papers():
    model = switch_model(num_experts_per_tok=1, router_init_std=0.02)
    config = dense_config("llama")
    routers = torch.cat([b.router.weight.flatten() for b in model.moe_blocks()])
    assert abs(routers.std().item() - 0.02) < 0.004
    gate = first_block(model).experts.gate_proj.weight  # (E, I, H): fan_in = hidden
    std = math.sqrt(0.1 / config.hidden_size)
    assert gate.shape == (4, config.intermediate_size, config.hidden_size)
    assert gate.abs().max() <= 2 * std + 1e-6  # truncated at 2 std
    assert 0.7 * std < gate.std() < std  # a normal truncated at 2 std has std 0.88 sigma
    assert not torch.equal(gate[0], gate[1])


@pytest.mark.parametrize("seq_len", [7, 16])
def test_expert_choice_each_expert_takes_its_top_c_tokens_per_sequence(seq_len):
    config = hf_moe.ExpertChoiceMoeConfig(
        text_config=dense_config("llama"), num_experts=4, moe_layers=[1], capacity_factor=2.0
    )
    block = first_block(AutoModelForCausalLM.from_config(config).train())
    hidden = torch.randn(3, seq_len, 32)
    record = routed(block, hidden)[1]
    capacity = round(2.0 * seq_len / 4)
    scores = record.router_logits.softmax(-1).view(3, seq_len, 4)
    assigned = record.assignments
    for seq in range(3):
        for expert in range(4):
            chosen = (
                assigned.token_idx[(assigned.expert_idx == expert) & (assigned.token_idx // seq_len == seq)] % seq_len
            )
            expected = scores[seq, :, expert].topk(capacity).indices
            assert set(chosen.tolist()) == set(expected.tolist())
    torch.testing.assert_close(assigned.weight, scores.view(-1, 4)[assigned.token_idx, assigned.expert_idx])


def test_under_autocast_the_experts_compute_in_the_autocast_dtype_and_routing_in_float32():
    # As nn.Linear does: the attention projections and the experts compute in bf16 under autocast.
    model = switch_model(capacity_factor=None).train()
    block = first_block(model)
    dtypes = {}
    for name, module in [("q_proj", model.backbone.model.layers[1].self_attn.q_proj), *block.experts.named_children()]:
        module.register_forward_hook(lambda module, args, out, name=name: dtypes.__setitem__(name, out.dtype))
    ids = torch.randint(3, 96, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, output_router_logits=True)
    assert dtypes == dict.fromkeys(["q_proj", "gate_proj", "act_fn", "up_proj", "down_proj"], torch.bfloat16)
    assert all(logits.dtype == torch.float32 for logits in out.router_logits)
    assert out.aux_loss.dtype == out.z_loss.dtype == torch.float32
    out.loss.backward()
    weight = block.experts.gate_proj.weight
    assert weight.dtype == weight.grad.dtype == torch.float32  # the parameters stay in float32
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_dropless_padding_pairs_are_kept_with_weight_zero_and_not_counted():
    # Dropless top-2: the pair count is fixed by the shapes (no nonzero); padding's pairs weigh 0.
    model = switch_model(capacity_factor=None, num_experts_per_tok=2).eval()
    block = first_block(model)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :4] = False
    block.token_mask = mask
    out, record = routed(block, torch.randn(2, 10, 32))
    out, assigned = out.view(20, 32), record.assignments
    assert assigned.token_idx.numel() == 2 * 10 * 2
    padding = ~mask.view(-1)
    assert (assigned.weight[padding[assigned.token_idx]] == 0).all()
    assert (out[padding] == 0).all() and (out[~padding].abs().sum(-1) > 0).all()

    ids = torch.randint(3, 96, (2, 10))
    stats = model(ids, attention_mask=mask.long(), output_router_logits=True)
    picks = stats.router_logits[0].topk(2, dim=-1).indices[~padding].flatten()
    torch.testing.assert_close(stats.expert_load[0], torch.bincount(picks, minlength=4) / picks.numel())
    assert stats.dropped_fraction[0] == 0


def test_expert_choice_slots_filled_with_padding_weigh_zero():
    # A sequence with fewer real tokens than the capacity C: the remaining slots take padding.
    config = hf_moe.ExpertChoiceMoeConfig(
        text_config=dense_config("llama"), num_experts=4, moe_layers=[1], capacity_factor=4.0
    )
    block = first_block(AutoModelForCausalLM.from_config(config).train())
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :6] = False  # 2 real tokens, C = 8
    block.token_mask = mask
    out, record = routed(block, torch.randn(2, 8, 32))
    out, assigned = out.view(16, 32), record.assignments
    assert assigned.token_idx.numel() == 2 * 4 * 8
    padding = ~mask.view(-1)
    assert (assigned.weight[padding[assigned.token_idx]] == 0).all()
    assert (assigned.weight[~padding[assigned.token_idx]] > 0).all()
    assert (out[padding] == 0).all() and (out[~padding].abs().sum(-1) > 0).all()
