"""The model guarantees on an accelerator, in float32 and bfloat16: save/load round trip, cached
generation, exactness of experts copied from the dense MLP, causality.

    pytest tests/modeling/test_on_device.py --device cuda -rs   # benchmarks/gpu_check.sh runs this

Skipped (with the reason) without ``--device`` or where the device is missing: never counted as passing.
Tolerances are per dtype; a routing or cache bug changes logits by O(1), far above them.
"""

import pytest
import torch
from backbones import VOCAB, copy_dense_into_experts, dense_config, learn_thresholds
from transformers import AutoModelForCausalLM

import hf_moe

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
ROUTINGS = pytest.mark.parametrize("routing", ["switch", "expert_choice", "aux_free"])
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=5e-2, atol=1e-1)}


@pytest.fixture(scope="module")
def device(request) -> torch.device:
    name = request.config.getoption("--device")
    if name == "cpu":
        pytest.skip("accelerator tests: run with --device cuda (benchmarks/gpu_check.sh does)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def causal_lm(routing, device, dtype, **overrides):
    config_class = hf_moe.routing_method(routing).config_class
    config = config_class(text_config=dense_config("llama"), num_experts=4, moe_layers=[1, 3], **overrides)
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    if routing == "aux_free":  # learned biases, which steer the selection at inference
        with torch.no_grad():
            for block in model.moe_blocks():
                block.router.expert_bias.copy_(torch.randn(4) * 0.1)
    if routing == "expert_choice":
        learn_thresholds(model)  # generation routes by the learned thresholds (causal mode)
    return model


@DTYPES
@ROUTINGS
def test_save_load_round_trip(routing, dtype, device, tmp_path):
    model = causal_lm(routing, device, dtype)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).to(device).eval()
    assert all(p.dtype == dtype for p in loaded.parameters())
    ids = torch.randint(3, VOCAB, (2, 12), device=device)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, **TOLERANCE[dtype])


@DTYPES
@ROUTINGS
def test_cached_generation_equals_full_forwards(routing, dtype, device):
    model = causal_lm(routing, device, dtype)
    model.generation_config.eos_token_id = None
    prompt = torch.randint(3, VOCAB, (1, 6), device=device)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model(out.sequences).logits[:, prompt.shape[1] - 1 : -1]  # the logits each step decided on
    torch.testing.assert_close(torch.stack(out.logits, dim=1).to(full.dtype), full, **TOLERANCE[dtype])


@DTYPES
@pytest.mark.parametrize(
    "routing, overrides",
    [
        ("switch", {"norm_topk_prob": True, "num_experts_per_tok": 2}),
        ("expert_choice", {"inference_routing": "threshold"}),  # untrained thresholds: all experts, weights sum 1
        ("aux_free", {}),  # sigmoid scores renormalised over the top-2
    ],
)
def test_experts_copied_from_the_dense_mlp_compute_the_dense_function(routing, overrides, dtype, device):
    dense = AutoModelForCausalLM.from_config(dense_config("llama")).eval()
    config_class = hf_moe.routing_method(routing).config_class
    moe = AutoModelForCausalLM.from_config(
        config_class(text_config=dense_config("llama"), num_experts=4, moe_layers="all", **overrides)
    ).eval()
    copy_dense_into_experts(moe, dense)
    dense, moe = dense.to(device=device, dtype=dtype), moe.to(device=device, dtype=dtype)
    ids = torch.randint(3, VOCAB, (2, 16), device=device)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, **TOLERANCE[dtype])


@DTYPES
@pytest.mark.parametrize("routing, training", [("switch", True), ("expert_choice", False)])
def test_outputs_do_not_depend_on_later_tokens(routing, training, dtype, device):
    # Switch with a binding training capacity (filled in token order); expert choice in threshold mode.
    overrides = {"capacity_factor": 0.5} if routing == "switch" else {}
    model = causal_lm(routing, device, dtype, **overrides).train(training)
    ids, t = torch.randint(3, VOCAB, (2, 24), device=device), 11
    perturbed = ids.clone()
    perturbed[:, t + 1 :] = torch.randint(3, VOCAB, (2, 24 - t - 1), device=device)
    with torch.no_grad():
        base, other = model(ids).logits, model(perturbed).logits
    torch.testing.assert_close(other[:, : t + 1], base[:, : t + 1], **TOLERANCE[dtype])
    assert not torch.allclose(other[:, t + 1 :], base[:, t + 1 :], **TOLERANCE[dtype])
