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
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import hf_moe

repo, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
work.mkdir(parents=True)
package = Path(hf_moe.__file__).resolve()
assert repo not in package.parents, f"hf_moe was imported from the source tree: {package}"
print(f"hf_moe {hf_moe.__version__} from {package.parent}")

# 1. Upcycle with the console script installed beside this interpreter; the dense checkpoint has a
# tiny byte-level BPE tokenizer, which the upcycler carries over for the recipe below.
lines = [f"the {a} sat on the {b} and then ate {c} ." for a in ("cat", "dog") for b in ("mat", "log") for c in "xyz"]
(work / "train.txt").write_text("\n".join(lines * 8) + "\n")
(work / "validation.txt").write_text("\n".join(lines) + "\n")
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator(
    lines,
    trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
)
tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
dense = LlamaConfig(
    vocab_size=len(tokenizer),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    eos_token_id=tokenizer.eos_token_id,
)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(dense).save_pretrained(work / "dense")
tokenizer.save_pretrained(work / "dense")
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
assert result.stdout.split() == ["SwitchMoeForCausalLM", "SwitchMoeModel", str(len(tokenizer))], result.stdout
config = json.loads((work / "moe" / "config.json").read_text())
assert config["hf_moe_version"] == hf_moe.__version__
print("remote-code load: ok")

# 3. A short fine-tuning run of the causal-LM recipe, with its model card.
flags = {
    "model_name_or_path": work / "moe",
    "train_file": work / "train.txt",
    "validation_file": work / "validation.txt",
    "output_dir": work / "finetuned",
    "max_length": 16,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "max_steps": 4,
    "eval_strategy": "steps",
    "eval_steps": 2,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "use_cpu": "true",
    "train_eval_samples": 8,
}
command = [sys.executable, str(repo / "recipes" / "finetune_clm.py")]
for name, value in flags.items():
    command += [f"--{name}", str(value)]
subprocess.run(command, check=True, cwd=work, env={**env, "OMP_NUM_THREADS": "1"})
card = (work / "finetuned" / "README.md").read_text()
assert "eval" in card.lower() and "hf_moe" in card, card[:500]
print("recipe run with model card: ok")
