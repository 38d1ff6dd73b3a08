"""Tiny models, a tiny byte-level tokenizer and tiny data files for the recipe tests, plus runners
for the recipes in-process (plain python) and under ``accelerate launch``."""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "under", "a", "mat", "log", "and", "then", "slept", "ate", "fish"]
POSITIVE = ["good", "great", "nice", "lovely", "fine"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly"]


def clm_lines(count: int, seed: int) -> list[str]:
    """Short sentences from a tiny grammar: easy to learn, so the loss falls within a few steps."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        subject = rng.choice(["the cat", "the dog", "a cat", "a dog"])
        verb = rng.choice(["sat on", "ran under", "slept on"])
        place = rng.choice(["the mat", "the log", "a mat"])
        lines.append(f"{subject} {verb} {place} and then ate fish .")
    return lines


def classification_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randrange(2)
        words = POSITIVE if label else NEGATIVE
        text = " ".join(rng.choice(words + ["the", "a", "movie", "was"]) for _ in range(6))
        rows.append({"sentence": text + " " + rng.choice(words), "label": ["negative", "positive"][label]})
    return rows


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


def tiny_dense_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=0,
        pad_token_id=1,
        bos_token_id=None,
    )


def make_assets(root: Path) -> dict:
    """Data files, tokenizer, a tiny switch_moe checkpoint and a tiny dense llama checkpoint."""
    from transformers import LlamaForCausalLM

    import hf_moe

    train_lines, validation_lines = clm_lines(160, seed=0), clm_lines(40, seed=1)
    (root / "train.txt").write_text("\n".join(train_lines) + "\n")
    (root / "validation.txt").write_text("\n".join(validation_lines) + "\n")
    with open(root / "train.jsonl", "w") as f:
        for line in train_lines:
            f.write(json.dumps({"body": line}) + "\n")
    instructions = root / "instructions.jsonl"
    with open(instructions, "w") as f:
        for line in train_lines[:80]:
            f.write(json.dumps({"prompt": "Q: " + line[:12], "response": line[12:]}) + "\n")
    rows = classification_rows(160, seed=2)
    with open(root / "classification_train.csv", "w") as f:
        f.write("sentence,label\n" + "".join(f"{r['sentence']},{r['label']}\n" for r in rows[:128]))
    with open(root / "classification_validation.csv", "w") as f:
        f.write("sentence,label\n" + "".join(f"{r['sentence']},{r['label']}\n" for r in rows[128:]))

    tokenizer = build_tokenizer(train_lines + [r["sentence"] for r in rows])
    dense_config = tiny_dense_config(len(tokenizer))
    torch.manual_seed(0)
    dense_dir = root / "dense"
    LlamaForCausalLM(dense_config).save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    torch.manual_seed(0)
    moe_config = hf_moe.SwitchMoeConfig(
        text_config=dense_config, num_experts=4, moe_layers=[1], router_aux_loss_coef=0.01
    )
    moe_dir = root / "switch"
    hf_moe.SwitchMoeForCausalLM(moe_config).save_pretrained(moe_dir)
    tokenizer.save_pretrained(moe_dir)
    return {"root": root, "dense": str(dense_dir), "switch": str(moe_dir)}


def clm_settings(assets: dict, output_dir, **overrides) -> dict:
    settings = {
        "model_name_or_path": assets["switch"],
        "train_file": str(assets["root"] / "train.txt"),
        "validation_file": str(assets["root"] / "validation.txt"),
        "max_length": 16,
        "packing": True,
        "packing_strategy": "wrapped",
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 3e-3,
        "max_steps": 8,
        "eval_strategy": "steps",
        "eval_steps": 4,
        "eval_on_start": True,
        "train_eval_samples": 16,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "output_dir": str(output_dir),
    }
    settings.update(overrides)
    return settings


def classification_settings(assets: dict, output_dir, **overrides) -> dict:
    settings = {
        "model_name_or_path": assets["switch"],
        "train_file": str(assets["root"] / "classification_train.csv"),
        "validation_file": str(assets["root"] / "classification_validation.csv"),
        "text_column": "sentence",
        "max_length": 16,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 3e-3,
        "max_steps": 8,
        "eval_strategy": "steps",
        "eval_steps": 4,
        "eval_on_start": True,
        "train_eval_samples": 32,
        "metric_for_best_model": "eval_validation_accuracy",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "output_dir": str(output_dir),
    }
    settings.update(overrides)
    return settings


def write_settings(path, settings: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(settings, f)
    return str(path)


def load_recipe(name: str):
    """The recipe script as a module (its ``main(argv)`` runs in this process with plain python)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_recipe(name: str, settings: dict, tmp_path, extra_args: list[str] = ()) -> dict:
    """Run a recipe in this process; resets accelerate's process-wide state before and after."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    config_file = write_settings(Path(tmp_path) / f"{name}_{len(os.listdir(tmp_path))}.yaml", settings)
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state()
    try:
        return load_recipe(name).main(["--config", config_file, *extra_args])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def launch_recipe(
    name: str, settings: dict, tmp_path, accelerate_config: str, launch_args: list[str] = (), check: bool = True
):
    """``accelerate launch --config_file recipes/accelerate/<config> [launch_args] recipes/<name>.py --config ...``."""
    config_file = write_settings(Path(tmp_path) / f"{name}_{Path(settings['output_dir']).name}_launch.yaml", settings)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(RECIPES / "accelerate" / accelerate_config),
        *launch_args,
        str(RECIPES / f"{name}.py"),
        "--config",
        config_file,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"accelerate launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def read_metrics(output_dir) -> list[dict]:
    """Trainer's log history (with `MoeCallback`'s values), saved as trainer_state.json."""
    with open(Path(output_dir) / "trainer_state.json") as f:
        return json.load(f)["log_history"]


def train_records(output_dir) -> list[dict]:
    return [r for r in read_metrics(output_dir) if "loss" in r]


def eval_records(output_dir) -> list[dict]:
    return [r for r in read_metrics(output_dir) if "eval_validation_task_loss" in r]
