"""upcycle_model: the in-memory API, and its agreement with the directory conversion."""

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB, tiny_config, tiny_dense
from transformers import AutoModel, AutoModelForSequenceClassification

from hf_moe import upcycle_checkpoint, upcycle_model


def read_checkpoint(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize(
    "model_type, options",
    [
        ("llama", {"expert_init": "copy"}),
        ("phi3", {"expert_init": "drop", "drop_ratio": 0.5}),
        ("gpt2", {"expert_init": "noise", "noise_std": 0.1, "moe_layers": "all"}),
        ("olmo2", {"routing": "expert_choice", "expert_init": "drop", "drop_ratio": 0.3}),
    ],
)
def test_directory_and_in_memory_conversion_give_identical_tensors(model_type, options, save_dense, tmp_path):
    dense, source = save_dense(model_type, sharded=True)
    settings = dict(num_experts=3, seed=5, **options)
    output = upcycle_checkpoint(source, tmp_path / "moe", max_shard_size="40KB", progress=False, **settings)
    on_disk = read_checkpoint(output)
    in_memory = upcycle_model(dense, **settings).state_dict()
    tied = set(upcycle_model(dense, **settings).all_tied_weights_keys)
    assert set(on_disk) == set(in_memory) - tied
    for name, tensor in on_disk.items():
        assert in_memory[name].dtype == tensor.dtype, name
        assert torch.equal(in_memory[name], tensor), name


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_in_memory_copy_upcycling_is_exact(model_type):
    dense = tiny_dense(model_type)
    moe = upcycle_model(dense, num_experts=4, num_experts_per_tok=2, moe_layers="all")
    assert not moe.training
    input_ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense(input_ids).logits
        assert ((moe(input_ids).logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_result_owns_its_tensors_and_leaves_the_dense_model_unchanged():
    dense = tiny_dense("llama")
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = upcycle_model(dense, num_experts=2)
    with torch.no_grad():
        for parameter in moe.parameters():
            parameter.zero_()
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())


@pytest.mark.parametrize(
    "auto_class, expected",
    [(AutoModel, "SwitchMoeModel"), (AutoModelForSequenceClassification, "SwitchMoeForSequenceClassification")],
)
def test_the_head_of_the_dense_model_is_kept(auto_class, expected):
    torch.manual_seed(0)
    dense = auto_class.from_config(tiny_config("llama", num_labels=3)).eval()
    moe = upcycle_model(dense, num_experts=4, num_experts_per_tok=2)
    assert type(moe).__name__ == expected
    input_ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        key = "logits" if expected.endswith("Classification") else "last_hidden_state"
        expected_out, actual = dense(input_ids)[key], moe(input_ids)[key]
    assert ((actual - expected_out).abs().max() / expected_out.abs().max()).item() <= 1e-5


def test_training_mode_follows_the_dense_model():
    dense = tiny_dense("llama").train()
    assert upcycle_model(dense, num_experts=2).training


def test_config_overrides_reach_the_config_and_upcycling_is_recorded():
    moe = upcycle_model(
        tiny_dense("llama"),
        num_experts=4,
        num_experts_per_tok=2,
        capacity_factor="dropless",
        router_z_loss_coef=0.0,
        seed=3,
    )
    config = moe.config
    assert (config.num_experts_per_tok, config.capacity_factor, config.router_z_loss_coef) == (2, None, 0.0)
    assert config.norm_topk_prob is True  # upcycling default: function preserving
    assert config.upcycling["seed"] == 3 and config.upcycling["expert_init"] == "copy"


def test_upcycling_defaults_to_renormalised_top_2_so_the_router_learns_from_the_task_loss():
    """Renormalised top-1 gives every token the gate 1.0, so the task loss cannot reach the router;
    renormalised top-2 keeps the dense function at step 0 and passes the router a gradient as soon
    as the two experts of a token differ (here: after one optimiser step, or with capacity drops)."""
    dense = tiny_dense("llama")
    ids = torch.randint(3, 90, (4, 16))

    def router_gradient(**options) -> float:
        torch.manual_seed(0)
        model = upcycle_model(dense, num_experts=4, moe_layers="all", router_aux_loss_coef=0.0, **options).train()
        model.config.router_z_loss_coef = 0.0
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(2):  # the second step sees experts that the first one made differ
            optimizer.zero_grad()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
        return sum(b.router.weight.grad.norm() ** 2 for b in model.moe_blocks()).sqrt().item()

    default = upcycle_model(dense, num_experts=4)
    assert (default.config.num_experts_per_tok, default.config.norm_topk_prob) == (2, True)
    assert upcycle_model(dense, num_experts=1).config.num_experts_per_tok == 1
    with pytest.warns(UserWarning, match="the single renormalised gate is always 1, so the routers get no gradient"):
        top1 = router_gradient(num_experts_per_tok=1, capacity_factor="dropless")
    top2 = router_gradient(capacity_factor="dropless")
    assert top1 < 1e-7 and top2 > 1e-4, (top1, top2)
