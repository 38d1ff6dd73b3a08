"""The MoE block's combine step: its hand-written backward against autograd's."""

import torch

from hf_moe.modeling.experts import WeightedScatterAdd


def test_combine_gradients_match_autograd_with_repeated_and_missing_tokens():
    # Token 0 and 3 get two pairs (top-2), token 4 none (dropped): (pairs, hidden) = (6, 5).
    token_idx = torch.tensor([0, 3, 3, 1, 0, 2])
    expert_out = torch.randn(6, 5, dtype=torch.double, requires_grad=True)
    weight = torch.rand(6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: WeightedScatterAdd.apply(y, w, token_idx, 5), (expert_out, weight))
    out = WeightedScatterAdd.apply(expert_out, weight, token_idx, 5)
    reference = torch.zeros(5, 5, dtype=torch.double).index_add_(0, token_idx, expert_out * weight[:, None])
    assert torch.equal(out, reference)
    assert (out[4] == 0).all()


def test_combine_keeps_float32_weight_gradients_for_bfloat16_experts():
    expert_out = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.rand(4, requires_grad=True)
    WeightedScatterAdd.apply(expert_out, weight, torch.tensor([1, 0, 2, 1]), 3).sum().backward()
    assert expert_out.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
