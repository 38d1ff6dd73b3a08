"""End-to-end demo: a dense LM, upcycled into a Switch MoE, fine-tuned with z-loss and expert dropout.

    python recipes/demo.py [--output_dir hf_moe_demo]

Offline, on CPU, a few minutes on 2 idle cores (the dense control adds a second, cheaper fine-tune;
``--no_dense_control`` skips it). Nothing is downloaded; the text is the Python
standard library's own source and docstrings, which ship with every interpreter, split into
training and validation by file.

1. Train a byte-level BPE tokenizer and a small dense llama causal LM on the training files.
2. Upcycle it on the fly into a ``switch_moe`` model and fine-tune it through the CLM recipe
   (``recipes/finetune_clm.py``, TRL's SFTTrainer, under ``accelerate launch``; settings in
   ``recipes/configs/demo_switch.yaml``): router z-loss, no dropout (nothing overfits in under
   one epoch; docs/study.md has the evidence).
   Then the dense control: the same recipe with ``--dense_control true`` fine-tunes the dense model
   with the same data, schedule and evaluation (``--no_dense_control`` skips it).
   Every expert is a copy of the dense MLP and the top-2 gates are renormalised, so the
   upcycled model at step 0 computes the dense function (its validation perplexity equals the
   dense one); with top-1 renormalised gates the router would get no gradient from the task loss.
3. Report validation perplexity: dense start, upcycled at step 0, after fine-tuning, and the dense
   control after the same fine-tuning, with tokens per second of both. The model,
   its card (with the expert-load and loss-curve plots) and TensorBoard logs are in the output folder.
"""

import argparse
import json
import math
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, get_scheduler

import hf_moe.training  # noqa: F401  (the fine-tuning steps need the [train] extra: checked up front)

RECIPES = Path(__file__).resolve().parent


def collect_stdlib_sources(train_chars: int, validation_chars: int) -> tuple[list[str], list[str]]:
    """Top-level standard library modules in sorted order; every 8th file goes to validation."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, validation = [], []
    for index, path in enumerate(sorted(stdlib.glob("*.py"))):
        text = path.read_text(encoding="utf-8", errors="replace")
        split, budget = (validation, validation_chars) if index % 8 == 0 else (train, train_chars)
        if sum(map(len, split)) + len(text) <= budget:
            split.append(text)
    return train, validation


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


def pack(texts: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Every text, each followed by EOS, concatenated and cut into blocks (the recipe's "wrapped" packing):
    (blocks, block_size)."""
    ids = [i for text in texts for i in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    usable = len(ids) // block_size * block_size
    return torch.tensor(ids[:usable]).view(-1, block_size)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 64) -> float:
    """exp(mean next-token NLL over every predicted token), as the recipe's evaluation computes it."""
    model.eval()
    nll = sum(model(input_ids=b, labels=b).loss.item() * len(b) for b in blocks.split(batch_size))
    model.train()
    return math.exp(nll / len(blocks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="hf_moe_demo")
    parser.add_argument("--dense_steps", type=int, default=300)
    parser.add_argument("--finetune_steps", type=int, default=120)
    parser.add_argument("--train_chars", type=int, default=1_500_000)
    parser.add_argument("--validation_chars", type=int, default=100_000)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo run")
    parser.add_argument(
        "--no_dense_control", dest="dense_control", action="store_false", help="skip the dense control fine-tune"
    )
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(0)
    output = Path(args.output_dir).resolve()
    if (output / "demo_report.json").exists() and not args.overwrite:
        raise SystemExit(f"{output} holds the results of an earlier demo run; pass --overwrite to replace them")
    (output / "data").mkdir(parents=True, exist_ok=True)

    # 1. Data: standard library sources, split by file.
    train_texts, validation_texts = collect_stdlib_sources(args.train_chars, args.validation_chars)
    for name, texts in (("train", train_texts), ("validation", validation_texts)):
        with open(output / "data" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    print(
        f"Data: {len(train_texts)} training files ({sum(map(len, train_texts)):,} characters), "
        f"{len(validation_texts)} validation files ({sum(map(len, validation_texts)):,} characters) "
        f"from {sysconfig.get_paths()['stdlib']}"
    )

    # 2. Tokenizer and dense model, trained briefly.
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_blocks, validation_blocks = pack(train_texts, tokenizer, 64), pack(validation_texts, tokenizer, 64)
    dense_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=3 * args.hidden_size,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    dense = LlamaForCausalLM(dense_config)
    optimizer = torch.optim.AdamW(dense.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=10, num_training_steps=args.dense_steps)
    generator = torch.Generator().manual_seed(0)
    batches = iter(())
    for _ in tqdm(range(args.dense_steps), desc="dense pre-training"):
        batch = next(batches, None)
        if batch is None:
            batches = iter(train_blocks[torch.randperm(len(train_blocks), generator=generator)].split(32))
            batch = next(batches)
        loss = dense(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    dense_perplexity = perplexity(dense, validation_blocks)
    dense_dir = output / "dense_lm"
    dense.save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    print(
        f"Dense LM ({sum(p.numel() for p in dense.parameters()):,} parameters, {args.dense_steps} steps): "
        f"validation perplexity {dense_perplexity:.3f}; saved in {dense_dir}"
    )

    # 3. Upcycle and fine-tune through the recipe, launched the standard way; then the dense control.
    data_files = [output / "data" / "train.jsonl", output / "data" / "validation.jsonl"]
    runs = {"switch": output / "switch_finetuned"}
    if args.dense_control:
        runs["dense"] = output / "dense_control"
    for name, folder in runs.items():
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(RECIPES / "accelerate" / "one_process.yaml"),
            "--mixed_precision",
            "no",
            str(RECIPES / "finetune_clm.py"),
            "--config",
            str(RECIPES / "configs" / "demo_switch.yaml"),
            "--model_name_or_path",
            str(dense_dir),
            "--train_file",
            str(data_files[0]),
            "--validation_file",
            str(data_files[1]),
            "--max_steps",
            str(args.finetune_steps),
            "--logging_steps",  # at least two training logs (step time, tokens/s), however short the run
            str(max(1, min(5, args.finetune_steps // 2))),
            "--output_dir",
            str(folder),
            *(["--overwrite_output_dir", "true"] if args.overwrite else []),
            *(["--dense_control", "true"] if name == "dense" else []),
        ]
        print("Running:", " ".join(command))
        if subprocess.run(command).returncode != 0:  # the recipe has printed its error
            raise SystemExit(f"demo: the {name} fine-tune failed; its error is above")

    # 4. Report.
    results = {}
    for name, folder in runs.items():
        with open(folder / "evaluations.json") as f:
            evaluations = json.load(f)
        with open(folder / "trainer_state.json") as f:
            speeds = [row["tokens_per_second"] for row in json.load(f)["log_history"] if "tokens_per_second" in row]
        results[name] = {"evaluations": evaluations, "tokens_per_second": sum(speeds) / max(len(speeds), 1)}
    history = results["switch"]["evaluations"]["evaluations"]
    upcycled, final = history[0], history[-1]
    report = {
        "dense_validation_perplexity": dense_perplexity,
        "upcycled_step0_validation_perplexity": upcycled["validation"]["perplexity"],
        "finetuned_validation_perplexity": final["validation"]["perplexity"],
        "finetuned_step": final["step"],
        "best_step": results["switch"]["evaluations"]["best"]["step"],
        "final_train_validation_gap": final["gap"],
        "switch_tokens_per_second": results["switch"]["tokens_per_second"],
    }
    if "dense" in results:
        # The dense start as the recipe evaluates it (the dense control at step 0): the same blocks and weighting.
        dense_history = results["dense"]["evaluations"]["evaluations"]
        report["dense_validation_perplexity"] = dense_history[0]["validation"]["perplexity"]
        dense_final = dense_history[-1]
        report["dense_control_validation_perplexity"] = dense_final["validation"]["perplexity"]
        report["dense_control_train_validation_gap"] = dense_final["gap"]
        report["dense_control_tokens_per_second"] = results["dense"]["tokens_per_second"]
    report["minutes"] = (time.time() - start) / 60
    with open(output / "demo_report.json", "w") as f:
        json.dump(report, f, indent=1)
    print("\nValidation perplexity (standard library held-out files):")
    print(f"  dense start                         {report['dense_validation_perplexity']:.3f}")
    print(f"  upcycled Switch MoE, step 0         {report['upcycled_step0_validation_perplexity']:.3f}")
    print(
        f"  Switch MoE fine-tuned, step {final['step']:<4}    {report['finetuned_validation_perplexity']:.3f}"
        f"   ({report['switch_tokens_per_second']:,.0f} tokens/s)"
    )
    if "dense" in results:
        print(
            f"  dense control, same fine-tuning     {report['dense_control_validation_perplexity']:.3f}"
            f"   ({report['dense_control_tokens_per_second']:,.0f} tokens/s)"
        )
    print(f"  best step {report['best_step']}; final train/validation gap {report['final_train_validation_gap']:+.4f}")
    print(f"Finished in {report['minutes']:.1f} minutes. Output folder: {output}")
    print(
        f"  model card: {runs['switch'] / 'README.md'} (plots: expert_load.png, loss_curves.png); "
        f"TensorBoard: tensorboard --logdir {runs['switch']}"
    )


if __name__ == "__main__":
    main()
