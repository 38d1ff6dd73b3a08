"""Use an installed hf_moe wheel as a user would, from outside the source tree.

    python wheel_check.py core REPO_ROOT WORK_DIR    # the wheel installed without extras
    python wheel_check.py train REPO_ROOT WORK_DIR   # then with [train], in the same WORK_DIR

core: the model card templates (model_cards/ in the repository) are in the installed wheel; import,
from_pretrained and generate; the console script upcycles a tiny dense checkpoint with
--verify (model card included), exports it to the native architecture and imports it back; the result
loads with trust_remote_code in a process that cannot import hf_moe; a recipe stops with one line
naming the [train] extra. train: a short fine-tuning recipe run with its model card.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_moe
from hf_moe.modeling.configuration_moe import MIN_TRANSFORMERS
from hf_moe.optional_dependencies import TRAIN_EXTRA, TRAIN_PACKAGES

phase, repo, work = sys.argv[1], Path(sys.argv[2]).resolve(), Path(sys.argv[3])
package = Path(hf_moe.__file__).resolve()
assert repo not in package.parents, f"hf_moe was imported from the source tree: {package}"
print(f"hf_moe {hf_moe.__version__} from {package.parent}, {phase} install")
script = Path(sys.executable).with_name("hf-moe")
env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
recipe = [sys.executable, str(repo / "recipes" / "finetune_clm.py")]


def run(*args: str) -> None:
    subprocess.run([str(script), *args], check=True)


def check_core() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    # yaml is also a transformers dependency, so it is there without the extra.
    extra = [name for name in TRAIN_PACKAGES if name != "yaml" and importlib.util.find_spec(name)]
    assert not extra, f"the core install holds [train] packages: {extra}"
    work.mkdir(parents=True)

    # 0. The model card templates came with the wheel: model_cards/*.md installed as hf_moe.card_templates.
    from hf_moe.cards import TEMPLATES

    templates = Path(str(TEMPLATES)).resolve()
    assert templates.parent == package.parent, f"the card templates are not inside the installed package: {templates}"
    installed = {path.name: path.read_text(encoding="utf-8") for path in templates.glob("*.md")}
    source = {path.name: path.read_text(encoding="utf-8") for path in (repo / "model_cards").glob("*.md")}
    assert installed == source, f"installed templates {sorted(installed)} differ from model_cards/ {sorted(source)}"
    print(f"model card templates in the wheel: {', '.join(sorted(installed))}")

    # 1. Upcycle with the console script; the dense checkpoint has a tiny byte-level BPE tokenizer,
    # which the upcycler carries over for generate and the recipe.
    lines = [f"the {a} sat on the {b} and ate {c} ." for a in ("cat", "dog") for b in ("mat", "log") for c in "xyz"]
    (work / "train.txt").write_text("\n".join(lines * 8) + "\n")
    (work / "validation.txt").write_text("\n".join(lines) + "\n")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
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
    # Every layer MoE, so that the export below has a native architecture (mixtral) to write.
    run("upcycle", str(work / "dense"), str(work / "moe"), "--num-experts", "4", "--moe-layers", "all", "--verify")
    card = (work / "moe" / "README.md").read_text()
    assert "hf_moe" in card and f"transformers {MIN_TRANSFORMERS} or newer" in card, card[:500]
    print("upcycle --verify with model card: ok")

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
    result = subprocess.run(
        [sys.executable, "-c", loader, str(work / "moe")], env=env, capture_output=True, text=True, cwd=work
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["SwitchMoeForCausalLM", "SwitchMoeModel", str(len(tokenizer))], result.stdout
    config = json.loads((work / "moe" / "config.json").read_text())
    assert config["hf_moe_version"] == hf_moe.__version__
    print("remote-code load: ok")

    # 3. from_pretrained and generate with hf_moe installed.
    model = AutoModelForCausalLM.from_pretrained(work / "moe").eval()
    prompt = AutoTokenizer.from_pretrained(work / "moe")("the cat sat", return_tensors="pt").input_ids
    output = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert type(model).__name__ == "SwitchMoeForCausalLM", type(model).__name__
    assert output.shape == (1, prompt.shape[1] + 4), output.shape
    print("from_pretrained and generate: ok")

    # 4. Export to the native architecture and import it back, each verified, with model cards.
    run("export", str(work / "moe"), str(work / "native"))
    native = json.loads((work / "native" / "config.json").read_text())
    run("import", str(work / "native"), str(work / "imported"))
    imported = json.loads((work / "imported" / "config.json").read_text())
    assert imported["model_type"] == "switch_moe", imported["model_type"]
    for folder in ("native", "imported"):
        assert "hf_moe" in (work / folder / "README.md").read_text(), folder
    print(f"export to {native['model_type']} and import back, with model cards: ok")

    # 5. A recipe without the [train] extra stops with one line naming it.
    result = subprocess.run([*recipe, "--help"], capture_output=True, text=True, cwd=work, env=env)
    named = [line for line in result.stderr.splitlines() if TRAIN_EXTRA in line]
    assert result.returncode != 0 and len(named) == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == named[0], result.stderr[-3000:]
    assert "ModuleNotFoundError" not in result.stderr, result.stderr[-3000:]
    missing = [TRAIN_PACKAGES[m] for m in TRAIN_PACKAGES if m != "yaml"]
    assert f"({', '.join(missing)} not installed)" in named[0], named[0]
    print(f"recipe without [train]: {named[0]}")


def check_train() -> None:
    # A short fine-tuning run of the causal-LM recipe on the upcycled model, with its model card.
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
    command = list(recipe)
    for name, value in flags.items():
        command += [f"--{name}", str(value)]
    subprocess.run(command, check=True, cwd=work, env={**env, "OMP_NUM_THREADS": "1"})
    card = (work / "finetuned" / "README.md").read_text()
    assert "eval" in card.lower() and "hf_moe" in card, card[:500]
    print("recipe run with model card: ok")


{"core": check_core, "train": check_train}[phase]()
