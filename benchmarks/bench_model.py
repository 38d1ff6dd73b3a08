"""Model benchmark: an upcycled llama-style MoE model against its dense backbone.

    python benchmarks/bench_model.py            # CPU fp32, 8 layers, hidden 512, 8 experts every other layer
    python benchmarks/bench_model.py --quick    # smoke run on a tiny model (seconds)

The dense model is a randomly initialised ``LlamaForCausalLM``; the MoE models are made from it
with `hf_moe.upcycling.upcycle_model` (every other layer MoE, top-1 Switch routing, experts
copied from the dense MLP), once dropless and once with the training capacity factor 1.25 (the
``SwitchMoeConfig`` default).

- Training: tokens per second of a full step (forward with labels, backward, AdamW step,
  gradients cleared) on the same batches for every model; the forward+backward part is also
  reported on its own, since AdamW's cost grows with the parameter count (the MoE model has
  more parameters, not more FLOPs per token).
- Decoding: greedy ``generate`` at batch 1 with a KV cache, milliseconds per generated token
  (the short prompt's prefill included), eval mode (dropless routing).

Medians of interleaved repetitions; ratios are against the dense backbone in the same process.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_moe.upcycling import upcycle_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    environment_lines,
    load_average,
    markdown_table,
    median,
    resolve_device_args,
    synchronize,
    time_interleaved,
)

DENSE = "dense llama (reference)"


def build_models(args, device, dtype) -> dict[str, torch.nn.Module]:
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq_len + args.prompt + args.new_tokens),
    )
    dense = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    moe = {}
    for label, capacity_factor in (("dropless", "dropless"), ("capacity 1.25", 1.25)):
        moe[f"hf_moe top-1 {label}, {args.experts} experts every other layer"] = upcycle_model(
            dense,
            routing="switch",
            num_experts=args.experts,
            moe_layers="every_other",
            num_experts_per_tok=1,
            capacity_factor=capacity_factor,
        ).to(device=device, dtype=dtype)
    return {DENSE: dense, **moe}


def training_cases(models, batches, device, clock=time.perf_counter):
    """One training step per call; records the forward+backward seconds of each call."""
    cases, prepare, fwd_bwd = {}, {}, {name: [] for name in models}
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step_index = [0]

        def step(model=model, optimizer=optimizer, name=name, step_index=step_index):
            batch = batches[step_index[0] % len(batches)]
            step_index[0] += 1
            start = clock()
            model(input_ids=batch, labels=batch).loss.backward()
            synchronize(device)
            fwd_bwd[name].append(clock() - start)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        cases[name] = step
        prepare[name] = model.train
    return cases, prepare, fwd_bwd


def decode_cases(models, prompt, new_tokens):
    def generate(model):
        with torch.no_grad():
            model.generate(
                prompt,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    return {name: (lambda model=model: generate(model)) for name, model in models.items()}, {
        name: model.eval for name, model in models.items()
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="training sequences per step")
    parser.add_argument("--seq-len", type=int, default=512, help="training sequence length")
    parser.add_argument("--prompt", type=int, default=16, help="decode prompt length")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode run")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="default: float32 on CPU, bfloat16 on CUDA"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU time of a single compute thread instead of wall time (implies --threads 1; CPU only): "
        "the cost of the work itself, which other processes on the machine cannot inflate",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and 2 repetitions: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.heads, args.vocab = 2, 64, 128, 4, 256
        args.batch, args.seq_len, args.new_tokens, args.reps = 2, 32, 8, 2
    resolve_device_args(parser, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    models = build_models(args, device, dtype)
    print("\n".join(environment_lines(device)))
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    print(
        f"model benchmark: {args.dtype} on {device.type}; llama {args.layers} layers, hidden {args.hidden}, "
        f"intermediate {args.intermediate}, vocab {args.vocab}; training batches {args.batch} x {args.seq_len} tokens; "
        f"decode batch 1, prompt {args.prompt}, {args.new_tokens} new tokens; "
        f"medians of {args.reps} interleaved repetitions"
        f"{' of single-thread CPU time' if args.cpu_time else ''}\n"
    )

    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=generator).to(device)
        for _ in range(args.reps + args.warmup)
    ]
    clock = time.thread_time if args.cpu_time else time.perf_counter
    cases, prepare, fwd_bwd = training_cases(models, batches, device, clock)
    step_seconds = time_interleaved(
        cases, reps=args.reps, warmup=args.warmup, device=device, prepare=prepare, clock=clock
    )
    tokens = args.batch * args.seq_len
    step_rate = {name: tokens / median(s) for name, s in step_seconds.items()}
    fwd_bwd_rate = {name: tokens / median(s[args.warmup :]) for name, s in fwd_bwd.items()}

    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=generator).to(device)
    cases, prepare = decode_cases(models, prompt, args.new_tokens)
    decode_seconds = time_interleaved(
        cases, reps=args.reps, warmup=args.warmup, device=device, prepare=prepare, clock=clock
    )
    per_token_ms = {name: 1e3 * median(s) / args.new_tokens for name, s in decode_seconds.items()}

    headers = [
        "model",
        "parameters (M)",
        "train step tokens/s",
        "vs dense",
        "fwd+bwd tokens/s",
        "vs dense",
        "decode ms/token",
        "vs dense",
    ]
    rows = []
    for name in models:
        rows.append(
            [
                name,
                f"{params[name] / 1e6:.1f}",
                f"{step_rate[name]:.0f}",
                f"{step_rate[name] / step_rate[DENSE]:.2f}x",
                f"{fwd_bwd_rate[name]:.0f}",
                f"{fwd_bwd_rate[name] / fwd_bwd_rate[DENSE]:.2f}x",
                f"{per_token_ms[name]:.1f}",
                f"{per_token_ms[name] / per_token_ms[DENSE]:.2f}x",
            ]
        )
    print(markdown_table(headers, rows))
    print("\ntargets (issue 5): training throughput >= 0.85x dense, decode latency <= 1.3x dense")
    for name in models:
        if name == DENSE:
            continue
        train, decode = step_rate[name] / step_rate[DENSE], per_token_ms[name] / per_token_ms[DENSE]
        print(
            f"- {name}: train step {train:.2f}x ({'PASS' if train >= 0.85 else 'MISS'}); "
            f"decode {decode:.2f}x ({'PASS' if decode <= 1.3 else 'MISS'})"
        )
    print(f"\nload average (1/5/15 min) at the end: {load_average()}")


if __name__ == "__main__":
    main()
