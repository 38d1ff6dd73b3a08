"""Use an installed hf_moe wheel as a user would, from outside the source tree.

Upcycles a tiny dense checkpoint with the console script (model card included), loads the result
with trust_remote_code in a process that cannot import hf_moe, and runs a short fine-tuning recipe
with its model card. Usage: python wheel_check.py REPO_ROOT WORK_DIR
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_moe

repo, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
work.mkdir(parents=True)
package = Path(hf_moe.__file__).resolve()
assert repo not in package.parents, f"hf_moe was imported from the source tree: {package}"
print(f"hf_moe {hf_moe.__version__} from {package.parent}")

# 1. Upcycle with the console script installed beside this interpreter.
dense = LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(dense).save_pretrained(work / "dense")
script = Path(sys.executable).with_name("hf-moe")
subprocess.run(
    [str(script), "upcycle", str(work / "dense"), str(work / "moe"), "--num-experts", "4", "--verify"], check=True
)
card = (work / "moe" / "README.md").read_text()
assert "hf_moe" in card, card[:500]
print("upcycle with model card: ok")

# 2. Remote code, without hf_moe importable.
loader = textwrap.dedent(
    """
    import sys
    sys.modules["hf_moe"] = None
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    headless = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.arange(3, 11)[None]
    print(type(model).__name__, type(headless).__name__, model(ids).logits.shape[-1])
    """
)
env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
result = subprocess.run(
    [sys.executable, "-c", loader, str(work / "moe")], env=env, capture_output=True, text=True, cwd=work
)
assert result.returncode == 0, result.stderr[-3000:]
assert result.stdout.split() == ["SwitchMoeForCausalLM", "SwitchMoeModel", "128"], result.stdout
config = json.loads((work / "moe" / "config.json").read_text())
assert config["hf_moe_version"] == hf_moe.__version__
print("remote-code load: ok")
