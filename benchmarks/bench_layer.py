"""Layer benchmark: hf_moe's MoE block against a dense SwiGLU MLP and transformers' MoE layers.

    python benchmarks/bench_layer.py            # CPU fp32: tokens 2048 and 8192, experts 8 and 32
    python benchmarks/bench_layer.py --quick    # smoke run on tiny sizes (seconds)
    python benchmarks/bench_layer.py --device cuda --dtype bfloat16 \
        --tokens 16384 --hidden 2048 --intermediate 5632 --experts 8 64   # the GPU sizes of the issue

An MoE layer whose tokens make P token-expert pairs does the work of a dense feed-forward layer
on P rows, so the reference is transformers' own SwiGLU MLP (``LlamaMLP``, the layer hf_moe turns
into experts) run on P = tokens * k rows. Each size compares, with the same hidden/intermediate
sizes and P:

- P = tokens: hf_moe top-1 dropless (Switch), hf_moe top-1 with capacity factor 1.25,
  transformers ``MixtralSparseMoeBlock`` top-1 with ``experts_implementation="grouped_mm"`` and
  ``"eager"``, transformers ``SwitchTransformersSparseMLP`` (its experts are ReLU MLPs with two
  matrices, so ``d_ff = 1.5 * intermediate`` to match the SwiGLU FLOPs, and ``expert_capacity =
  seq_len`` so that it is dropless, like the reference);
- P = 2 * tokens: hf_moe top-2 dropless, hf_moe Expert Choice with c = 2, Mixtral top-2
  ``grouped_mm`` and ``eager``;
- with float32 weights, also under ``torch.autocast(dtype=bfloat16)`` (the recipes' mixed
  precision): the dense SwiGLU, hf_moe top-1 dropless (its experts compute in bf16, as nn.Linear
  does) and Mixtral top-1 ``grouped_mm`` (transformers casts the input to the weights' dtype).

Routers are freshly initialised (std 0.02) and inputs are standard normal, so expert loads are
close to balanced. "fwd" is an inference forward (eval mode, no_grad); "fwd+bwd" is a training
forward and backward (train mode, gradients cleared untimed before each run). Peak memory is the
tensor memory of one fwd+bwd above what was allocated before it (see common.py), relative to the
reference, and the same with the weights frozen (no weight gradients: E experts have E times
the dense layer's weight gradients, whatever the number of tokens). Timings are medians of
interleaved repetitions; ratios are against the reference measured in the same process.
``--cpu-time`` times the CPU time of a single compute thread instead of wall time, and
``--profile`` prints where one fwd+bwd spends its time instead of timing.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, MixtralConfig, SwitchTransformersConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

import hf_moe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    environment_lines,
    load_average,
    markdown_table,
    median,
    peak_memory_bytes,
    resolve_device_args,
    time_interleaved,
)

REFERENCE = "dense SwiGLU (reference)"


@dataclass
class Case:
    """One layer and its input: ``module(hidden)`` with ``hidden`` (batch, seq, hidden)."""

    name: str
    pairs_per_token: int  # k: the reference for this case runs on tokens * k rows
    module: nn.Module
    hidden: torch.Tensor
    autocast: bool = False  # run under torch.autocast(dtype=bfloat16)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.module(hidden)


def llama_config(args) -> LlamaConfig:
    heads = max(1, args.hidden // 64)
    return LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32,
    )


def hf_moe_block(args, experts: int, expert_choice: bool = False, **moe) -> nn.Module:
    """The MoeBlock of a one-layer hf_moe model (built and initialised by the model itself)."""
    config_class, model_class = (
        (hf_moe.ExpertChoiceMoeConfig, hf_moe.ExpertChoiceMoeModel)
        if expert_choice
        else (hf_moe.SwitchMoeConfig, hf_moe.SwitchMoeModel)
    )
    config = config_class(text_config=llama_config(args), num_experts=experts, moe_layers=[0], **moe)
    return model_class(config).moe_blocks()[0]


def normal_init(module: nn.Module) -> nn.Module:
    # transformers' standalone MoE layers leave their 3-D expert parameters uninitialised.
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.02)
    return module


def build_cases(args, tokens: int, experts: int, device, dtype) -> tuple[dict[int, Case], list[Case]]:
    """(reference per k, MoE cases) for one size."""
    seq_len = min(args.seq_len, tokens)
    batch = tokens // seq_len
    hidden = torch.randn(batch, seq_len, args.hidden)
    references = {
        k: Case(REFERENCE, k, normal_init(LlamaMLP(llama_config(args))), hidden.repeat(k, 1, 1)) for k in (1, 2)
    }

    def mixtral(k, implementation):
        config = MixtralConfig(
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_local_experts=experts,
            num_experts_per_tok=k,
            experts_implementation=implementation,
        )
        return normal_init(MixtralSparseMoeBlock(config))

    switch_config = SwitchTransformersConfig(
        d_model=args.hidden,
        d_ff=3 * args.intermediate // 2,
        num_experts=experts,
        expert_capacity=seq_len,
        dropout_rate=0.0,
        router_jitter_noise=0.0,
    )
    cases = [
        Case(
            "hf_moe top-1 dropless", 1, hf_moe_block(args, experts, num_experts_per_tok=1, capacity_factor=None), hidden
        ),
        Case(
            "hf_moe top-1 capacity 1.25",
            1,
            hf_moe_block(args, experts, num_experts_per_tok=1, capacity_factor=1.25, eval_capacity_factor=1.25),
            hidden,
        ),
        Case("Mixtral top-1 grouped_mm", 1, mixtral(1, "grouped_mm"), hidden),
        Case("Mixtral top-1 eager", 1, mixtral(1, "eager"), hidden),
        Case("SwitchTransformers top-1", 1, normal_init(SwitchTransformersSparseMLP(switch_config)), hidden),
        Case(
            "hf_moe top-2 dropless", 2, hf_moe_block(args, experts, num_experts_per_tok=2, capacity_factor=None), hidden
        ),
        Case(
            "hf_moe expert choice c=2", 2, hf_moe_block(args, experts, expert_choice=True, capacity_factor=2.0), hidden
        ),
        Case("Mixtral top-2 grouped_mm", 2, mixtral(2, "grouped_mm"), hidden),
        Case("Mixtral top-2 eager", 2, mixtral(2, "eager"), hidden),
    ]
    if dtype == torch.float32:
        cases += [
            Case("dense SwiGLU, bf16 autocast", 1, normal_init(LlamaMLP(llama_config(args))), hidden, autocast=True),
            Case(
                "hf_moe top-1 dropless, bf16 autocast",
                1,
                hf_moe_block(args, experts, num_experts_per_tok=1, capacity_factor=None),
                hidden,
                autocast=True,
            ),
            Case("Mixtral top-1 grouped_mm, bf16 autocast", 1, mixtral(1, "grouped_mm"), hidden, autocast=True),
        ]
    for case in [*references.values(), *cases]:
        case.module.to(device=device, dtype=dtype)
        case.hidden = case.hidden.to(device=device, dtype=dtype)
    return references, cases


def forward(case: Case):
    def run():
        with torch.no_grad():
            case(case.hidden)

    return run


def forward_backward(case: Case):
    hidden = case.hidden.detach().requires_grad_()
    grad = torch.randn_like(hidden)

    def prepare():
        case.module.zero_grad(set_to_none=True)
        hidden.grad = None

    def run():
        out = case(hidden)
        out.backward(grad.to(out.dtype))  # bf16 under autocast

    return prepare, run


def bench_size(args, tokens: int, experts: int, device, dtype) -> list[list[str]]:
    references, cases = build_cases(args, tokens, experts, device, dtype)
    everything = {f"{REFERENCE} k={k}": case for k, case in references.items()} | {c.name: c for c in cases}
    runs, clear_gradients = {}, []
    for name, case in everything.items():
        runs[(name, "fwd")] = forward(case)
        prep, run = forward_backward(case)
        runs[(name, "fwd+bwd")] = run
        clear_gradients.append(prep)

    def prepare_for(mode, module):
        def prepare():
            # Only the case about to run holds gradients (memory at the large GPU sizes).
            for clear in clear_gradients:
                clear()
            module.train(mode == "fwd+bwd")

        return prepare

    prepare = {(name, mode): prepare_for(mode, everything[name].module) for name, mode in runs}
    ms = {}
    if not args.memory_only:
        clock = time.thread_time if args.cpu_time else time.perf_counter
        seconds = time_interleaved(
            runs, reps=args.reps, warmup=args.warmup, device=device, prepare=prepare, clock=clock
        )
        ms = {key: 1e3 * median(values) for key, values in seconds.items()}

    memory, frozen_memory = {}, {}
    if not args.no_memory:
        for name, case in everything.items():
            prepare[(name, "fwd+bwd")]()
            memory[name] = peak_memory_bytes(runs[(name, "fwd+bwd")], device)
            # The same with the weights frozen: activations, temporaries and the input gradient,
            # without the weight gradients (E experts have E times the dense layer's).
            weights = [p for p in case.module.parameters() if p.requires_grad]
            for weight in weights:
                weight.requires_grad_(False)
            prepare[(name, "fwd+bwd")]()
            frozen_memory[name] = peak_memory_bytes(runs[(name, "fwd+bwd")], device)
            for weight in weights:
                weight.requires_grad_(True)

    mixtral_gmm = {1: "Mixtral top-1 grouped_mm", 2: "Mixtral top-2 grouped_mm"}
    rows = []
    for name, case in everything.items():
        k = case.pairs_per_token
        reference = f"{REFERENCE} k={k}"
        label = f"dense SwiGLU on {k}x{tokens} rows (reference)" if case.name == REFERENCE else name
        row = [str(tokens), str(experts), label]
        if ms:
            for mode in ("fwd", "fwd+bwd"):
                row += [f"{ms[(name, mode)]:.1f}", f"{ms[(name, mode)] / ms[(reference, mode)]:.2f}x"]
            row.append(
                "" if case.name == REFERENCE else f"{ms[(mixtral_gmm[k], 'fwd+bwd')] / ms[(name, 'fwd+bwd')]:.2f}x"
            )
        if memory:
            row += [
                f"{memory[name] / 2**20:.1f}",
                f"{memory[name] / memory[reference]:.2f}x",
                f"{frozen_memory[name] / 2**20:.1f}",
                f"{frozen_memory[name] / frozen_memory[reference]:.2f}x",
            ]
        rows.append(row)
    return rows


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
# Metadata-only operators (views, scalar reads, allocations): no kernel, no parallel region.
NO_KERNEL_OPS = {
    f"aten::{name}"
    for name in (
        "view",
        "_unsafe_view",
        "reshape",
        "as_strided",
        "slice",
        "select",
        "transpose",
        "t",
        "expand",
        "unsqueeze",
        "squeeze",
        "permute",
        "alias",
        "detach",
        "item",
        "_local_scalar_dense",
        "empty",
        "empty_like",
        "empty_strided",
        "resolve_conj",
        "resolve_neg",
        "to",
        "lift_fresh",
        "result_type",
        "chunk",
        "split",
        "narrow",
        "linear",
        "matmul",
        "_grouped_mm",
        "flatten",
        "contiguous",
    )
}


def profile_rows(args, tokens: int, experts: int, device, dtype) -> list[list[str]]:
    """Where one fwd+bwd spends its time: matrix products against everything else.

    Operator self times from torch.profiler for one run after a warm-up. "kernel calls" counts
    the operators that do work (views, scalar reads and wrappers such as aten::linear or
    aten::_grouped_mm, whose work is in the aten::mm calls under them, excluded): on CPU each is
    a parallel region whose threads must all get a core before it can finish.
    """
    references, cases = build_cases(args, tokens, experts, device, dtype)
    rows = []
    for case in [*references.values(), *cases]:
        if case.name not in (REFERENCE, "hf_moe top-1 dropless", "hf_moe top-2 dropless", "Mixtral top-1 grouped_mm"):
            continue
        prepare, run = forward_backward(case)
        case.module.train()
        prepare()
        run()
        prepare()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        matmul = sum(e.self_cpu_time_total for e in events if e.name in MATMUL_OPS) / 1e3
        label = f"dense SwiGLU on {case.pairs_per_token}x{tokens} rows" if case.name == REFERENCE else case.name
        rows.append(
            [
                str(tokens),
                str(experts),
                label,
                f"{total:.1f}",
                f"{matmul:.1f}",
                f"{total - matmul:.1f}",
                str(sum(e.name not in NO_KERNEL_OPS for e in events)),
                str(sum(e.name in MATMUL_OPS for e in events)),
            ]
        )
    return rows


TARGETS = (
    # (case, fwd+bwd ratio to the reference at most, speed-up over Mixtral grouped_mm at least)
    ("hf_moe top-1 dropless", 1.10, 1.2),
    ("hf_moe top-2 dropless", 1.10, 1.2),
    ("hf_moe expert choice c=2", 1.10, 1.2),
)
MEMORY_TARGET = 1.25


def verdict(met: bool) -> str:
    return "PASS" if met else "MISS"


def target_lines(rows: list[list[str]], tokens: int, memory: bool) -> list[str]:
    """PASS/MISS of the issue's CPU targets, read from the table rows at ``tokens``."""
    lines = []
    for row in rows:
        if row[0] != str(tokens):
            continue
        for name, max_ratio, min_speedup in TARGETS:
            if row[2] != name:
                continue
            ratio, speedup = float(row[6].rstrip("x")), float(row[7].rstrip("x"))
            checks = [
                f"fwd+bwd {ratio:.2f}x reference (target <= {max_ratio}): {verdict(ratio <= max_ratio)}",
                f"{speedup:.2f}x faster than Mixtral grouped_mm (target >= {min_speedup}): "
                f"{verdict(speedup >= min_speedup)}",
            ]
            if memory:
                mem = float(row[9].rstrip("x"))
                checks.append(
                    f"peak memory {mem:.2f}x reference (target <= {MEMORY_TARGET}): {verdict(mem <= MEMORY_TARGET)} "
                    f"({row[11]} with frozen weights)"
                )
            lines.append(f"- tokens {row[0]}, experts {row[1]}, {name}: " + "; ".join(checks))
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument(
        "--seq-len", type=int, default=2048, help="tokens per sequence (capacity and expert choice are per sequence)"
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory pass, no timing")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU time of a single compute thread instead of wall time (implies --threads 1; CPU only): "
        "the cost of the work itself, which other processes on the machine cannot inflate",
    )
    parser.add_argument(
        "--profile", action="store_true", help="instead of timing, print a per-layer profile of one fwd+bwd"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 repetitions: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.experts, args.hidden, args.intermediate, args.seq_len = [256], [4], 64, 128, 128
        args.reps, args.warmup = 2, 1
    resolve_device_args(parser, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    headers = ["tokens", "experts", "layer"]
    if not args.memory_only:
        headers += ["fwd ms", "fwd vs ref", "fwd+bwd ms", "fwd+bwd vs ref", "fwd+bwd speed-up vs Mixtral grouped_mm"]
    if not args.no_memory:
        headers += ["fwd+bwd peak MiB", "peak vs ref", "frozen-weights peak MiB", "frozen vs ref"]
    print("\n".join(environment_lines(device)))
    print(
        f"layer benchmark: {args.dtype} on {device.type}, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"sequences of {args.seq_len} tokens, medians of {args.reps} interleaved repetitions"
        f"{' of single-thread CPU time' if args.cpu_time else ''}\n"
    )
    if args.profile:
        headers = [
            "tokens",
            "experts",
            "layer",
            "aten self ms",
            "matmul ms",
            "other ms",
            "kernel calls",
            "matmul calls",
        ]
        rows = [
            row
            for tokens in args.tokens
            for experts in args.experts
            for row in profile_rows(args, tokens, experts, device, dtype)
        ]
        print(markdown_table(headers, rows))
        return
    rows = []
    for tokens in args.tokens:
        for experts in args.experts:
            rows += bench_size(args, tokens, experts, device, dtype)
            print(f"done: tokens {tokens}, experts {experts}", file=sys.stderr, flush=True)
    print(markdown_table(headers, rows))
    if not args.memory_only:
        print("\ntargets (issue 5, at the largest token count):")
        print("\n".join(target_lines(rows, max(args.tokens), not args.no_memory)))
    print(f"\nload average (1/5/15 min) at the end: {load_average()}")


if __name__ == "__main__":
    main()
