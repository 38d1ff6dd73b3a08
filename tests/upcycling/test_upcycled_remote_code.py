"""The converted folder loads with trust_remote_code in a process where hf_moe cannot be imported."""

import subprocess
import sys
import textwrap

import torch

from hf_moe import upcycle_checkpoint

LOAD_WITHOUT_HF_MOE = textwrap.dedent(
    """
    import sys
    sys.modules["hf_moe"] = None  # any import of the installed package now fails
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert "hf_moe" not in type(model).__module__.split(".")[0], type(model).__module__
    input_ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(input_ids).logits, sys.argv[3])
    print(type(model).__module__, type(model).__name__)
    """
)


def test_trust_remote_code_without_hf_moe(save_dense, tmp_path):
    dense, source = save_dense("gemma3_text")
    output = upcycle_checkpoint(source, tmp_path / "moe", num_experts=4, num_experts_per_tok=2, progress=False)
    input_ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.save(input_ids, tmp_path / "ids.pt")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_HF_MOE, str(output), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SwitchMoeForCausalLM" in result.stdout and "transformers_modules" in result.stdout
    with torch.no_grad():
        expected = dense(input_ids).logits
    logits = torch.load(tmp_path / "logits.pt")
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5
