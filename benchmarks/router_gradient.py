"""Does the router learn from the task loss after copy upcycling? One table per gate setting.

    python benchmarks/router_gradient.py [--steps 60]

A random 4-layer llama (hidden 64, vocabulary 128) is upcycled with copied experts into 8 experts
in every layer, then fine-tuned with AdamW (lr 1e-3, no weight decay) on a first-order Markov-chain
language (each token has 4 equally likely successors), with the router losses switched off so
that the routers can only learn from the task loss. Columns: largest |logit| deviation from the
dense model at step 0 (eval mode), the routers' gradient norm at steps 0, 1, 10 and the last, how
far the router weights moved (Frobenius norm), the eval loss after training and the mean router
entropy (log 8 = 2.08 is uniform). The dense model's own eval loss is the reference line.
"""

import argparse
import platform
import warnings

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from hf_moe import upcycle_model
from hf_moe.upcycling import UpcyclingWarning

CASES = {
    "top-1 renormalised": dict(num_experts_per_tok=1, norm_topk_prob=True),
    "top-2 renormalised (default)": dict(num_experts_per_tok=2, norm_topk_prob=True),
    "top-1 raw gate (Switch)": dict(num_experts_per_tok=1, norm_topk_prob=False),
    "top-2 renormalised, dropless training": dict(
        num_experts_per_tok=2, norm_topk_prob=True, capacity_factor="dropless"
    ),
    "top-1 renormalised, dropless training": dict(
        num_experts_per_tok=1, norm_topk_prob=True, capacity_factor="dropless"
    ),
}
VOCAB, EXPERTS = 128, 8


def markov_batches(seed: int):
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, 4), generator=generator)

    def batch(rows: int = 16, length: int = 32) -> torch.Tensor:
        ids = torch.empty(rows, length, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (rows,), generator=generator)
        for t in range(1, length):
            ids[:, t] = successors[ids[:, t - 1], torch.randint(0, 4, (rows,), generator=generator)]
        return ids

    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UpcyclingWarning)  # top-1 renormalised is measured on purpose
    print(f"{platform.platform()}, torch {torch.__version__}, transformers {transformers.__version__}")
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB,
    )  # fmt: skip
    dense = AutoModelForCausalLM.from_config(config).eval()
    batch = markov_batches(1)
    eval_ids = batch(32)
    with torch.no_grad():
        dense_logits = dense(eval_ids).logits
        print(f"dense model eval loss (reference): {dense(eval_ids, labels=eval_ids).loss.item():.4f}")
    checkpoints = sorted({0, 1, 10, args.steps})
    print(
        "| gates | step-0 deviation | "
        + " | ".join(f"router grad step {s}" for s in checkpoints)
        + " | router change | eval loss | router entropy |"
    )
    print("|---" * (len(checkpoints) + 5) + "|")
    for name, options in CASES.items():
        torch.manual_seed(0)
        model = upcycle_model(
            dense, num_experts=EXPERTS, moe_layers="all", router_aux_loss_coef=0.0, router_z_loss_coef=0.0, **options
        )
        with torch.no_grad():
            deviation = (model(eval_ids).logits - dense_logits).abs().max().item()
        routers = [block.router.weight for block in model.moe_blocks()]
        start = [w.detach().clone() for w in routers]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        model.train()
        norms = {}
        for step in range(args.steps + 1):
            ids = batch()
            optimizer.zero_grad()
            model(ids, labels=ids).loss.backward()
            if step in checkpoints:
                norms[step] = torch.sqrt(sum((w.grad.float() ** 2).sum() for w in routers)).item()
            if step < args.steps:
                optimizer.step()
        model.eval()
        with torch.no_grad():
            out = model(eval_ids, labels=eval_ids, output_router_logits=True)
            entropy = sum(
                -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item()
                for p in (r.softmax(-1) for r in out.router_logits)
            ) / len(out.router_logits)
        moved = torch.sqrt(sum((w.detach() - s).norm() ** 2 for w, s in zip(routers, start, strict=True))).item()
        print(
            f"| {name} | {deviation:.1e} | "
            + " | ".join(f"{norms[s]:.1e}" for s in checkpoints)
            + f" | {moved:.2e} | {out.loss.item():.4f} | {entropy:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
