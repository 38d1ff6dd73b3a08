"""What the study measures on saved models, beyond what the recipes log: the test split (the recipes evaluate the
validation split, which the study uses to choose), the raw router logits, and Expert Choice's inference routings."""

import json
from pathlib import Path

import torch

from .data import StudyData


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def final_step(run: Path) -> int:
    return json.loads((run / "trainer_state.json").read_text())["global_step"]


def _sources(checkpoints: list[Path], run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint and of the final model when no checkpoint holds its step."""
    sources = [(_step(c), c) for c in checkpoints]
    last = final_step(run)
    return sources if last in {step for step, _ in sources} else sources + [(last, run)]


@torch.no_grad()
def lm_loss(model, blocks: torch.Tensor, device: str, batch_size: int = 64) -> float:
    """Mean next-token loss over the blocks (every block full, so the mean over blocks is the mean over tokens)."""
    model.eval()
    total = sum(
        model(input_ids=b.to(device), labels=b.to(device)).loss.float().item() * len(b)
        for b in blocks.split(batch_size)
    )
    return total / len(blocks)


def load_lm(source: Path, device: str, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs).to(device)


def lm_test_losses(checkpoints: list[Path], run: Path, blocks: torch.Tensor, device: str) -> dict[str, float]:
    """{step: test loss} of every checkpoint and the final model."""
    return {str(step): lm_loss(load_lm(source, device), blocks, device) for step, source in _sources(checkpoints, run)}


@torch.no_grad()
def router_statistics(run: Path, blocks: torch.Tensor, device: str, batch_size: int = 64) -> dict[str, float]:
    """The final model's router logits x (tokens, experts) on the test split, every MoE layer's tokens together:

    - ``rms_logsumexp``: sqrt(mean_t (log sum_j exp x_tj)^2), the root of the z-loss (ST-MoE eq. 5), which is what
      the z-loss acts on;
    - ``logit_rms``, ``logit_mean``, ``max_abs_logit``: the raw logits;
    - ``spread``: the standard deviation across experts, averaged over tokens (what routing depends on: softmax and
      top-k are unchanged by a shift of all of a token's logits, which changes the logsumexp).
    """
    model = load_lm(run, device)
    model.eval()
    sums = dict.fromkeys(("lse2", "x2", "x", "spread"), 0.0)
    tokens = values = 0
    largest = 0.0
    for batch in blocks.split(batch_size):
        outputs = model(input_ids=batch.to(device), output_router_logits=True)
        for logits in outputs.router_logits:  # (tokens, experts) per MoE layer
            logits = logits.float()
            sums["lse2"] += logits.logsumexp(dim=-1).square().sum().item()
            sums["x2"] += logits.square().sum().item()
            sums["x"] += logits.sum().item()
            sums["spread"] += logits.std(dim=-1, correction=0).sum().item()
            largest = max(largest, logits.abs().max().item())
            tokens += logits.shape[0]
            values += logits.numel()
    return {
        "rms_logsumexp": (sums["lse2"] / tokens) ** 0.5,
        "logit_rms": (sums["x2"] / values) ** 0.5,
        "logit_mean": sums["x"] / values,
        "max_abs_logit": largest,
        "spread": sums["spread"] / tokens,
    }


@torch.no_grad()
def classification_scores(
    checkpoints: list[Path], run: Path, data: StudyData, device: str, max_length: int
) -> dict[str, dict]:
    """{step: {"loss", "accuracy"}} on the test snippets (cut to ``max_length`` tokens, as the recipe cuts the
    training and validation ones), for every checkpoint and the final model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in (data.folder / "cls_test.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(run)
    scores = {}
    for step, source in _sources(checkpoints, run):
        model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32).to(device).eval()
        labels = torch.tensor([model.config.label2id[r["label"]] for r in rows])
        loss = correct = 0.0
        for begin in range(0, len(rows), 64):
            texts = [r["text"] for r in rows[begin : begin + 64]]
            inputs = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            target = labels[begin : begin + 64].to(device)
            logits = model(**inputs.to(device)).logits.float()
            loss += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(dim=-1) == target).sum().item()
        scores[str(step)] = {"loss": loss / len(rows), "accuracy": correct / len(rows)}
    return scores


def upcycled(dense_start: Path, moe) -> torch.nn.Module:
    """The dense start upcycled as a run of ``moe`` (a `runs.Moe`) upcycles it, before any training."""
    from transformers import LlamaForCausalLM

    from hf_moe import upcycle_model

    dense = LlamaForCausalLM.from_pretrained(dense_start, dtype=torch.float32)
    return upcycle_model(
        dense,
        routing=moe.routing,
        num_experts=moe.experts,
        moe_layers=moe.layers,
        capacity_factor=float(moe.capacity),
        seed=moe.seed,
    )


def inference_routing_losses(sources: list[tuple[int, object]], blocks: torch.Tensor, device: str) -> list[dict]:
    """Expert Choice: the test loss of each (step, model or folder) with ``threshold`` routing (causal, what
    generation uses) and ``expert_choice`` routing (as in training, looking at the whole sequence)."""
    rows = []
    for step, source in sources:
        row = {"step": step}
        for mode in ("threshold", "expert_choice"):
            if isinstance(source, Path):
                model = load_lm(source, device, inference_routing=mode)
            else:
                model = source.to(device)
                model.config.inference_routing = mode
                for module in model.modules():
                    if hasattr(module, "inference_routing"):
                        module.inference_routing = mode
            row[mode] = lm_loss(model, blocks, device)
        rows.append(row)
    return rows
