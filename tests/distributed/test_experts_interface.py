"""The experts' side of expert parallelism, in one process: transformers' experts interface."""

import copy
import io

import torch
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from hf_moe.modeling.experts import GroupedExperts, make_experts

HIDDEN, INTERMEDIATE = 16, 32


def experts_and_dense_copies(num_experts: int, expert_parallel_size: int = 1):
    """Experts whose expert e computes the dense MLP ``dense[e]``; under expert parallelism the
    module holds the first ``num_experts / expert_parallel_size`` of them, as rank 0 does."""
    config = AutoConfig.for_model(
        "llama", hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=2, num_key_value_heads=2
    )
    dense = [LlamaMLP(config) for _ in range(num_experts)]
    experts = make_experts(LlamaMLP(config), num_experts, HIDDEN, 0.0, "llama", expert_parallel_size)
    held = experts.num_experts
    for name in ("gate_proj", "up_proj", "down_proj"):
        stacked = torch.stack([getattr(d, name).weight.detach() for d in dense[:held]])
        getattr(experts, name).weight = torch.nn.Parameter(stacked)
    return experts, dense


def test_rows_get_the_weighted_sum_of_their_experts():
    experts, dense = experts_and_dense_copies(4)
    assert isinstance(experts, GroupedExperts) and experts.holds_all_experts
    x = torch.randn(5, HIDDEN)
    index = torch.tensor([[3, 0], [1, 1], [2, 0], [0, 3], [1, 2]])  # (rows, k)
    weights = torch.rand(5, 2)
    expected = torch.stack([sum(weights[r, j] * dense[index[r, j]](x[r]) for j in range(2)) for r in range(5)])
    torch.testing.assert_close(experts(x, index, weights), expected)


def test_experts_held_by_other_ranks_add_exactly_zero_and_no_gradient():
    # Rank 0 of two holds experts 0 and 1; transformers' all-reduce dispatch marks the others with id 2, weight 0.
    experts, dense = experts_and_dense_copies(4, expert_parallel_size=2)
    assert experts.num_experts == 2 and not experts.holds_all_experts
    x = torch.randn(6, HIDDEN, requires_grad=True)
    index = torch.tensor([[0, 2], [2, 2], [1, 0], [2, 1], [2, 2], [1, 2]])
    weights = torch.rand(6, 2).masked_fill(index == 2, 0.0)
    out = experts(x, index, weights)
    local = [[j for j in range(2) if index[r, j] < 2] for r in range(6)]
    expected = torch.stack(
        [sum((weights[r, j] * dense[index[r, j]](x[r]) for j in local[r]), torch.zeros(HIDDEN)) for r in range(6)]
    )
    torch.testing.assert_close(out, expected)
    assert (out[[1, 4]] == 0).all()
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    reference = torch.autograd.grad((expected * grad).sum(), x)[0]
    torch.testing.assert_close(x.grad, reference)  # finite, and 0 for rows routed elsewhere only
    assert (x.grad[[1, 4]] == 0).all()


def test_experts_survive_deepcopy_and_pickle():
    experts, _ = experts_and_dense_copies(4)
    x, index, weights = torch.randn(3, HIDDEN), torch.tensor([[0], [3], [1]]), torch.rand(3, 1)
    buffer = io.BytesIO()
    torch.save(experts, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(experts), torch.load(buffer, weights_only=False)):
        assert type(other) is type(experts) and other.gate_proj.layout is other.layout is not experts.layout
        torch.testing.assert_close(other(x, index, weights), experts(x, index, weights))
