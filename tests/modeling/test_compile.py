"""torch.compile of a training step in float32 and bfloat16, against eager.

torch's meta kernel of grouped_mm, which compilation traces, takes bfloat16 only; other dtypes run
grouped_mm eagerly between compiled graphs. The ``aot_eager`` backend traces forward and backward
through the same fake-tensor kernels as inductor, without inductor's code generation; the default
``inductor`` backend (minutes on CPU) runs with ``--runslow``.
"""

import pytest
import torch
from backbones import VOCAB, dense_config
from transformers import AutoModelForCausalLM

import hf_moe

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("config_class", [hf_moe.SwitchMoeConfig, hf_moe.ExpertChoiceMoeConfig], ids=["switch", "ec"])
def test_compiled_training_step_equals_eager(config_class, dtype, backend):
    torch._dynamo.reset()  # a fresh compilation per case (routing settings differ between cases)
    config = config_class(text_config=dense_config("llama", num_hidden_layers=1), num_experts=4, moe_layers=[0])
    model = AutoModelForCausalLM.from_config(config).to(dtype).train()
    ids = torch.randint(3, VOCAB, (2, 8))
    buffers = {name: b.clone() for name, b in model.named_buffers()}

    def step(module):
        model.zero_grad()
        for name, b in model.named_buffers():  # expert-choice thresholds move with every step
            b.copy_(buffers[name])
        loss = module(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = step(model)
    compiled_loss, compiled_grads = step(torch.compile(model, backend=backend))
    torch.testing.assert_close(compiled_loss, eager_loss, **TOLERANCE[dtype])
    assert compiled_grads.keys() == eager_grads.keys() and any("experts" in n for n in eager_grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, **TOLERANCE[dtype], msg=name)
