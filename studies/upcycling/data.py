"""The study's data, all local: the Python standard library's own sources (as ``recipes/demo.py``).

- language modelling: top-level modules split by file into training and validation (every 8th file held out),
  the training files cut into pieces of about 1,500 characters;
- classification: snippets of consecutive non-blank lines of the largest top-level modules, labelled by module.
"""

import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from recipes.demo import collect_stdlib_sources, pack, train_tokenizer

# Sizes. Full: about 25 minutes on 2 idle cores (an hour on a busy shared one); quick: under 2 minutes.
FULL = {
    "train_chars": 1_500_000,
    "validation_chars": 60_000,
    "vocab_size": 1024,
    "hidden_size": 128,
    "layers": 4,
    "block": 64,
    "batch": 32,
    "pretrain_steps": 300,
    "steps": 100,
    "dense_steps_factor": 1.6,
    "eval_steps": 25,
    "logging_steps": 5,
    "train_eval_samples": 48,
    "seeds": 3,
    "classes": 6,
    "train_per_class": 32,
    "validation_per_class": 32,
    "epochs": 10,
    "cls_batch": 16,
    "cls_seeds": 2,
    "ec_steps": 160,
    "ec_save_steps": 40,
    "stress_lr": 1e-2,
}
QUICK = {
    **FULL,
    "train_chars": 60_000,
    "validation_chars": 8_000,
    "vocab_size": 300,
    "hidden_size": 32,
    "layers": 2,
    "block": 32,
    "batch": 8,
    "pretrain_steps": 10,
    "steps": 6,
    "eval_steps": 3,
    "logging_steps": 1,
    "train_eval_samples": 16,
    "seeds": 2,
    "classes": 3,
    "train_per_class": 8,
    "validation_per_class": 4,
    "epochs": 2,
    "cls_batch": 8,
    "cls_seeds": 1,
    "ec_steps": 6,
    "ec_save_steps": 3,
}


@dataclass
class StudyData:
    """The files the runs read (``folder``), the tokenizer, the packed validation blocks and the module labels."""

    folder: Path
    tokenizer: object
    validation_blocks: torch.Tensor  # (blocks, block) token ids
    modules: list[str]


def chunks(text: str, size: int) -> list[str]:
    """``text`` cut at line ends into pieces of at least ``size`` characters (the last one may be shorter)."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        if len(current) >= size:
            pieces.append(current)
            current = ""
    return pieces + ([current] if current.strip() else [])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def prepare_data(output: Path, size: dict, tokenizer_folder: Path) -> StudyData:
    """Write the language-modelling and classification files under ``output/data``; the tokenizer is the one saved
    in ``tokenizer_folder`` by an interrupted study being resumed, else a new one trained on the training files."""
    folder = output / "data"
    folder.mkdir(parents=True, exist_ok=True)
    train, validation = collect_stdlib_sources(size["train_chars"], size["validation_chars"])
    # Training files cut into pieces of about 1,500 characters at line ends, so that the training subset scored
    # for the gap (train_eval_samples) spans many files rather than the blocks of one or two whole files.
    train = [piece for text in train for piece in chunks(text, 1500)]
    write_jsonl(folder / "train.jsonl", [{"text": t} for t in train])
    write_jsonl(folder / "validation.jsonl", [{"text": t} for t in validation])
    if (tokenizer_folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    else:
        tokenizer = train_tokenizer(train, size["vocab_size"])
    modules = classification_data(folder, size)
    return StudyData(folder, tokenizer, pack(validation, tokenizer, size["block"]), modules)


def classification_data(folder: Path, size: dict) -> list[str]:
    """Snippets of six consecutive non-blank lines of the largest top-level standard library modules,
    labelled by module; training and validation snippets are disjoint, drawn from the same files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(stdlib.glob("*.py"), key=lambda p: (-p.stat().st_size, p.name))[: size["classes"]]
    rng = random.Random(0)
    rows = {"train": [], "validation": []}
    for path in modules:
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        snippets = ["\n".join(lines[i : i + 6]) for i in range(0, len(lines) - 5, 6)]
        rng.shuffle(snippets)
        n_train, n_val = size["train_per_class"], size["validation_per_class"]
        label = path.stem
        rows["train"] += [{"text": t, "label": label} for t in snippets[:n_train]]
        rows["validation"] += [{"text": t, "label": label} for t in snippets[n_train : n_train + n_val]]
    for name, items in rows.items():
        rng.shuffle(items)
        write_jsonl(folder / f"cls_{name}.jsonl", items)
    return [p.stem for p in modules]
