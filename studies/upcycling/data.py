"""The study's data, all local: the Python standard library's own sources (as ``recipes/demo.py``).

- language modelling: modules split by file into training, validation and test (every 8th file held out, the held-out
  files alternating between validation and test), the training files cut into pieces of about 1,500 characters.
  Validation chooses (learning rates, checkpoints); test reports.
- classification: snippets of consecutive non-blank lines of the largest top-level modules, labelled by module;
  training, validation and test snippets are disjoint, drawn from the same files.

The sizes: `FULL` (about 70 minutes on 2 idle cores), `QUICK` (a pipeline check), `SCALE` (a GPU machine, >= 100M
parameters, the whole standard library) and `SCALE_QUICK` (`SCALE`'s code path at toy size).
"""

import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from recipes.demo import pack, train_tokenizer

FULL = {
    # data
    "recursive": False,  # top-level modules only (4.7M characters)
    "train_chars": 1_500_000,
    "held_out_chars": 120_000,  # validation + test
    "vocab_size": 1024,
    # the dense start (llama)
    "hidden_size": 128,
    "intermediate_size": 384,
    "layers": 4,
    "heads": 4,
    "block": 64,
    "batch": 32,
    "pretrain_steps": 300,
    "pretrain_lr": 3e-3,
    "starts": 2,  # dense pre-training starts (model initialisation and data order)
    # fine-tuning (sections 1, 3, 4 and the sweeps)
    "steps": 100,
    "dense_steps_factor": 1.6,  # the dense continuation runs longer, to be read at the MoE's FLOPs and CPU time
    "learning_rate": 1e-3,
    "eval_steps": 20,  # evaluations and the checkpoints scored on the test split
    "logging_steps": 5,
    "train_eval_samples": 48,
    "seeds": 3,  # fine-tuning seeds per start (data order, router initialisation)
    "stress_lr": 1e-2,
    "sweep_seeds": 3,  # sweeps: start 0 with these seeds
    "lr_factors": [0.5, 1.0, 2.0],
    "ec_steps": 100,
    "ec_seeds": 2,  # Expert Choice: fine-tuning seeds per start
    # classification (section 2)
    "classes": 4,
    "snippet_lines": 16,
    "train_per_class": 64,
    "validation_per_class": 32,
    "test_per_class": 48,
    "cls_max_length": 128,
    "epochs": 8,  # measured: learns well above chance and the gap grows over the last epochs
    "cls_batch": 16,
    "cls_lr": 1e-3,
    "cls_seeds": 3,  # on start 0
    # where
    "use_cpu": True,
    "bf16": False,
}
QUICK = {
    **FULL,
    "train_chars": 60_000,
    "held_out_chars": 16_000,
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 96,
    "layers": 2,
    "block": 32,
    "batch": 8,
    "pretrain_steps": 10,
    "starts": 2,
    "steps": 6,
    "eval_steps": 3,
    "logging_steps": 1,
    "train_eval_samples": 16,
    "seeds": 2,
    "sweep_seeds": 2,
    "ec_steps": 6,
    "ec_seeds": 1,
    "classes": 3,
    "snippet_lines": 8,
    "train_per_class": 8,
    "validation_per_class": 4,
    "test_per_class": 4,
    "cls_max_length": 64,
    "epochs": 2,
    "cls_batch": 8,
    "cls_seeds": 2,
}
# >= 100M parameters (llama, hidden 768, 12 layers: 119M dense), on one GPU with bf16 autocast; the whole standard
# library (about 100M characters of Python under the interpreter's stdlib folder, site-packages excluded).
SCALE = {
    **FULL,
    "recursive": True,
    "train_chars": 60_000_000,
    "held_out_chars": 2_000_000,
    "vocab_size": 16_384,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layers": 12,
    "heads": 12,
    "block": 512,
    "batch": 32,
    "pretrain_steps": 6000,
    "pretrain_lr": 6e-4,
    "steps": 1000,
    "learning_rate": 2e-4,
    "eval_steps": 200,
    "logging_steps": 20,
    "train_eval_samples": 256,
    "stress_lr": 2e-3,
    "ec_steps": 1000,
    "cls_max_length": 256,
    "cls_lr": 1e-4,
    "use_cpu": False,
    "bf16": True,
}
SCALE_QUICK = {**QUICK, "recursive": True, "intermediate_size": 128, "heads": 4}


def sizes(quick: bool, scale: bool) -> dict:
    return dict((SCALE_QUICK if quick else SCALE) if scale else (QUICK if quick else FULL))


@dataclass
class StudyData:
    """The files the runs read (``folder``), the tokenizer, the packed test blocks and the class labels."""

    folder: Path
    tokenizer: object
    test_blocks: torch.Tensor  # (blocks, block) token ids
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


def stdlib_files(recursive: bool) -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not recursive:
        return sorted(stdlib.glob("*.py"))
    return sorted(
        p for p in stdlib.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(stdlib).parts)
    )


def split_sources(size: dict) -> dict[str, list[str]]:
    """Files in sorted order; every 8th is held out, alternately for validation and test; each split up to its
    character budget."""
    splits = {"train": [], "validation": [], "test": []}
    budgets = {"train": size["train_chars"], "validation": size["held_out_chars"] // 2}
    budgets["test"] = budgets["validation"]
    used = dict.fromkeys(splits, 0)
    for index, path in enumerate(stdlib_files(size["recursive"])):
        name = "train" if index % 8 else ("validation" if index % 16 == 0 else "test")
        if used[name] >= budgets[name]:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if used[name] + len(text) <= budgets[name]:
            splits[name].append(text)
            used[name] += len(text)
    return splits


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def prepare_data(output: Path, size: dict, tokenizer_folder: Path) -> StudyData:
    """Write the language-modelling and classification files under ``output/data``; the tokenizer is the one saved
    in ``tokenizer_folder`` by an interrupted study being resumed, else a new one trained on the training files."""
    folder = output / "data"
    folder.mkdir(parents=True, exist_ok=True)
    splits = split_sources(size)
    # Training files cut into pieces of about 1,500 characters at line ends, so that the training subset scored
    # for the gap (train_eval_samples) spans many files rather than the blocks of one or two whole files.
    splits["train"] = [piece for text in splits["train"] for piece in chunks(text, 1500)]
    for name, texts in splits.items():
        write_jsonl(folder / f"{name}.jsonl", [{"text": t} for t in texts])
    if (tokenizer_folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    else:
        tokenizer = train_tokenizer(splits["train"], size["vocab_size"])
    modules = classification_data(folder, size)
    return StudyData(folder, tokenizer, pack(splits["test"], tokenizer, size["block"]), modules)


def classification_data(folder: Path, size: dict) -> list[str]:
    """Snippets of ``snippet_lines`` consecutive non-blank lines of the ``classes`` largest top-level standard
    library modules, labelled by module, written as ``cls_{train,validation,test}.jsonl``; returns the labels."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(stdlib.glob("*.py"), key=lambda p: (-p.stat().st_size, p.name))[: size["classes"]]
    rng = random.Random(0)
    counts = {name: size[f"{name}_per_class"] for name in ("train", "validation", "test")}
    rows = {name: [] for name in counts}
    n = size["snippet_lines"]
    for path in modules:
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        snippets = ["\n".join(lines[i : i + n]) for i in range(0, len(lines) - n + 1, n)]
        if len(snippets) < sum(counts.values()):
            raise ValueError(
                f"{path.name} has {len(snippets)} snippets of {n} lines, fewer than the "
                f"{sum(counts.values())} the sizes ask for (train/validation/test_per_class)"
            )
        rng.shuffle(snippets)
        start = 0
        for name, count in counts.items():
            rows[name] += [{"text": t, "label": path.stem} for t in snippets[start : start + count]]
            start += count
    for name, items in rows.items():
        rng.shuffle(items)
        write_jsonl(folder / f"cls_{name}.jsonl", items)
    return [p.stem for p in modules]
