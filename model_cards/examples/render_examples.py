"""Render the example model cards of this folder from a real tiny run; never edit them by hand.

    python model_cards/examples/render_examples.py [--output_dir model_cards/examples]

A tiny random llama (2 layers, hidden size 32, a byte-level BPE tokenizer) is upcycled into a Switch
MoE with ``hf-moe upcycle --verify``, exported to its native architecture (Mixtral) with ``hf-moe
export`` and imported back with ``hf-moe import``; the upcycled model is then fine-tuned for a few steps
with ``recipes/finetune_clm.py``. The ``README.md`` of each output is copied here as ``upcycled.md``,
``exported.md``, ``imported.md`` and ``finetuned.md`` with the fine-tune's plots (``loss_curves.png``,
``expert_load.png``); the conversion cards name their sources by absolute path, so the temporary
folder's path is taken out of them.
tests/recipes/test_card_examples.py renders them again and checks that the ones here match, numbers aside.
Needs the [train] extra (the fine-tune). Offline, about a minute on 2 CPU cores.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CARDS = ("upcycled", "exported", "imported", "finetuned")
PLOTS = ("expert_load.png", "loss_curves.png")


def write_dense_model_and_data(folder: Path) -> None:
    """``dense/`` (a tiny random llama with a byte-level BPE tokenizer), ``train.txt``, ``validation.txt``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    lines = [f"the {a} sat on the {b} and ate {c} ." for a in ("cat", "dog") for b in ("mat", "log") for c in "xyz"]
    (folder / "train.txt").write_text("\n".join(lines * 8) + "\n")
    (folder / "validation.txt").write_text("\n".join(lines) + "\n")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=alphabet)
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "dense")
    tokenizer.save_pretrained(folder / "dense")


def render(output_dir: Path) -> None:
    """Every example card (and the fine-tune's plots) written into ``output_dir``."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_dense_model_and_data(work)

        def run(*command: str) -> None:
            # Relative folder names, so that the cards name "dense", "upcycled", ... and no temporary path.
            subprocess.run([sys.executable, *command], cwd=work, env=environment, check=True)

        hf_moe = ("-m", "hf_moe.cli")
        run(*hf_moe, "upcycle", "dense", "upcycled", "--num-experts", "4", "--moe-layers", "all", "--verify")
        run(*hf_moe, "export", "upcycled", "exported")
        run(*hf_moe, "import", "exported", "imported")
        flags = {
            "model_name_or_path": "upcycled",
            "train_file": "train.txt",
            "validation_file": "validation.txt",
            "output_dir": "finetuned",
            "max_length": 16,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 8,
            "learning_rate": 0.003,
            "max_steps": 12,
            "eval_strategy": "steps",
            "eval_steps": 4,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": "true",
            "bf16": "false",
            "train_eval_samples": 8,
            "router_z_loss_coef": 0.001,
        }
        run(
            str(REPO / "recipes" / "finetune_clm.py"),
            *[item for name, value in flags.items() for item in (f"--{name}", str(value))],
        )

        output_dir.mkdir(parents=True, exist_ok=True)
        for card in CARDS:
            text = (work / card / "README.md").read_text(encoding="utf-8")
            text = text.replace(f"{work.resolve()}{os.sep}", "")
            (output_dir / f"{card}.md").write_text(text, encoding="utf-8")
        for plot in PLOTS:
            shutil.copyfile(work / "finetuned" / plot, output_dir / plot)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent)
    render(parser.parse_args().output_dir)
