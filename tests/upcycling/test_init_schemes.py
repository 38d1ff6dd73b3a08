"""Expert initialisation: copy, noise and drop change exactly what they claim, reproducibly."""

import pytest
import torch
from tiny_models import tiny_dense

from hf_moe import upcycle_model

NUM_EXPERTS = 4


def experts_of(moe, layer: int):
    layers = moe.backbone.transformer.h if hasattr(moe.backbone, "transformer") else moe.backbone.model.layers
    return layers[layer].mlp


def dense_mlp(dense, layer: int):
    layers = dense.transformer.h if hasattr(dense, "transformer") else dense.model.layers
    return layers[layer].mlp


def test_copy_gives_identical_experts_and_a_seeded_router():
    dense = tiny_dense("llama")
    moe = upcycle_model(dense, num_experts=NUM_EXPERTS, router_init_std=0.05, seed=1)
    block = experts_of(moe, 1)
    for name in ("gate_proj", "up_proj", "down_proj"):
        stacked = getattr(block.experts, name).weight
        assert all(torch.equal(stacked[e], getattr(dense_mlp(dense, 1), name).weight) for e in range(NUM_EXPERTS))
    router = block.router.weight
    assert router.shape == (NUM_EXPERTS, 32) and 0.03 < router.std().item() < 0.07
    again = experts_of(upcycle_model(dense, num_experts=NUM_EXPERTS, router_init_std=0.05, seed=1), 1).router.weight
    other = experts_of(upcycle_model(dense, num_experts=NUM_EXPERTS, router_init_std=0.05, seed=2), 1).router.weight
    assert torch.equal(router, again) and not torch.equal(router, other)


def test_noise_is_scaled_to_each_weight_std_and_differs_between_experts():
    dense = tiny_dense("gpt2")
    moe = upcycle_model(dense, num_experts=NUM_EXPERTS, expert_init="noise", noise_std=0.1, seed=0)
    block, original = experts_of(moe, 1), dense_mlp(dense, 1)
    for name in ("c_fc", "c_proj"):
        weight, dense_weight = getattr(block.experts, name).weight, getattr(original, name).weight
        deltas = weight - dense_weight  # (experts, in, out)
        for e in range(NUM_EXPERTS):
            ratio = deltas[e].std().item() / dense_weight.std().item()
            assert 0.09 < ratio < 0.11, (name, e, ratio)
        assert not torch.equal(weight[0], weight[1])
        # biases stay copies
        assert all(
            torch.equal(getattr(block.experts, name).bias[e], getattr(original, name).bias) for e in range(NUM_EXPERTS)
        )


def _reinitialised_neurons(moe, dense, layer, names, neuron_axes, groups, intermediate):
    """Per expert and projection, the set of neurons whose weights differ from the dense ones."""
    block, original = experts_of(moe, layer), dense_mlp(dense, layer)
    result = {}
    for name, axis, group in zip(names, neuron_axes, groups, strict=True):
        dense_weight = getattr(original, name).weight
        for e in range(NUM_EXPERTS):
            changed = getattr(block.experts, name).weight[e] != dense_weight
            per_index = changed.any(dim=1 - axis)  # (rows or columns,)
            halves = per_index.view(group, intermediate)
            assert torch.equal(halves, halves[:1].expand_as(halves)), f"{name}: fused halves must drop the same neurons"
            result[(name, e)] = set(halves[0].nonzero().flatten().tolist())
    return result


@pytest.mark.parametrize(
    "model_type, names, neuron_axes, groups",
    [
        ("llama", ("gate_proj", "up_proj", "down_proj"), (0, 0, 1), (1, 1, 1)),
        ("phi3", ("gate_up_proj", "down_proj"), (0, 1), (2, 1)),  # fused: rows j and I + j
        ("gpt2", ("c_fc", "c_proj"), (1, 0), (1, 1)),  # Conv1D: [in, out]
    ],
)
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_drop_reinitialises_the_ratio_of_neurons_shared_across_projections(
    model_type, names, neuron_axes, groups, ratio
):
    dense = tiny_dense(model_type)
    moe = upcycle_model(dense, num_experts=NUM_EXPERTS, expert_init="drop", drop_ratio=ratio, seed=0)
    intermediate = getattr(experts_of(moe, 1).experts, names[-1]).weight.shape[2 if neuron_axes[-1] == 1 else 1]
    dropped = _reinitialised_neurons(moe, dense, 1, names, neuron_axes, groups, intermediate)
    for e in range(NUM_EXPERTS):
        sets = [dropped[(name, e)] for name in names]
        assert all(s == sets[0] for s in sets), "the same neurons in every projection"
        # every other neuron is an exact copy, so the changed set is exactly the dropped set
        assert len(sets[0]) == round(ratio * intermediate)
    assert dropped[(names[0], 0)] != dropped[(names[0], 1)], "experts drop different neurons"


def test_drop_draws_from_the_statistics_of_the_replaced_weights():
    dense = tiny_dense("llama", intermediate_size=256)
    with torch.no_grad():
        dense.model.layers[1].mlp.up_proj.weight.mul_(10).add_(3.0)  # mean 3, std ~ 10 x init
    moe = upcycle_model(dense, num_experts=2, expert_init="drop", drop_ratio=0.5, seed=0)
    weight = experts_of(moe, 1).experts.up_proj.weight[0]
    original = dense.model.layers[1].mlp.up_proj.weight
    changed_rows = (weight != original).any(dim=1)
    fresh, replaced = weight[changed_rows], original[changed_rows]
    assert abs(fresh.mean().item() - replaced.mean().item()) < 0.1 * replaced.std().item()
    assert 0.9 < fresh.std().item() / replaced.std().item() < 1.1


@pytest.mark.parametrize(
    "scheme", [{"expert_init": "noise", "noise_std": 0.05}, {"expert_init": "drop", "drop_ratio": 0.5}]
)
def test_schemes_are_reproducible_with_the_same_seed(scheme):
    dense = tiny_dense("llama")
    first = upcycle_model(dense, num_experts=NUM_EXPERTS, seed=11, **scheme).state_dict()
    second = upcycle_model(dense, num_experts=NUM_EXPERTS, seed=11, **scheme).state_dict()
    third = upcycle_model(dense, num_experts=NUM_EXPERTS, seed=12, **scheme).state_dict()
    name = "backbone.model.layers.1.mlp.experts.down_proj.weight"
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first[name], third[name])
    # only MoE layers change: layer 0 and 2 feed-forward blocks are the dense ones
    assert torch.equal(
        first["backbone.model.layers.0.mlp.down_proj.weight"], dense.model.layers[0].mlp.down_proj.weight
    )
