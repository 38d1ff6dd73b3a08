"""Real sizes: `hf-moe upcycle --plan` next to a measured conversion of a Qwen3-0.6B-shaped model.

    python benchmarks/scale_check.py --workdir /tmp              # 28 layers: 0.6B dense -> 2.45B MoE; ~12 GB of disk
    python benchmarks/scale_check.py --layers 2 --vocab 32000    # a smaller run of the same width

Writes a dense qwen3 checkpoint with random bfloat16 weights (Qwen3-0.6B's shape: hidden 1024,
intermediate 3072, 16 heads, 8 key-value heads, head_dim 128, vocabulary 151936, tied embeddings),
streamed tensor by tensor, so the dense model is never in memory. Then, each in a fresh process:
`hf-moe upcycle SOURCE MOE --num-experts 8 --moe-layers all --verify` and `hf-moe export MOE NATIVE`.
For each step it reports the wall time, the process' peak RSS (VmHWM) and the bytes written, next to
what `plan_upcycling` predicts from the config alone (computed in a fresh process too, so its baseline
is that of a process that imported the same code). All files are deleted at the end unless --keep.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_upcycle import peak_rss  # noqa: E402
from common import environment_lines, markdown_table  # noqa: E402

QWEN3_0_6B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
)
TOLERANCE = 0.2  # plan and measurement agree within 20%
TRAIN_SEQ_LEN = 64


def dense_config(layers: int, vocab: int):
    from transformers import AutoConfig

    fields = {**QWEN3_0_6B, "num_hidden_layers": layers, "vocab_size": vocab}
    return AutoConfig.for_model("qwen3", **fields, dtype="bfloat16", architectures=["Qwen3ForCausalLM"])


def write_dense_checkpoint(folder: Path, config) -> int:
    """Random bfloat16 weights (norms 1), one tensor in memory at a time; returns the bytes written."""
    from transformers import AutoModelForCausalLM

    from hf_moe.checkpoints.streaming import OutputTensor, write_sharded_safetensors

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = set(model.all_tied_weights_keys)
    tensors = [
        OutputTensor(name, torch.bfloat16, tuple(t.shape)) for name, t in model.state_dict().items() if name not in tied
    ]
    generator = torch.Generator().manual_seed(0)

    def produce(out: OutputTensor):
        if len(out.shape) == 1:
            yield torch.ones(out.shape, dtype=out.dtype)
        else:
            yield (torch.randn(out.shape, generator=generator) * 0.02).to(out.dtype)

    folder.mkdir(parents=True)
    write_sharded_safetensors(folder, tensors, produce, max_shard_size=2 * 10**9, progress=False)
    config.save_pretrained(folder)
    return sum(t.nbytes for t in tensors)


def worker(argv: list[str]) -> None:
    """Runs in the measured process: one `hf-moe` command, then one JSON line of measurements."""
    import psutil

    from hf_moe.cli import main

    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    status = main(argv)
    print(json.dumps({"status": status, "seconds": time.perf_counter() - start, "baseline_rss": baseline,
                      "peak_rss": peak_rss()}))  # fmt: skip


def plan_worker(source: str, experts: int) -> None:
    """Runs in a fresh process: the plan, as `hf-moe upcycle --plan` would compute it, as JSON."""
    import hf_moe.cli  # noqa: F401  (the imports of the CLI: part of the baseline)
    from hf_moe.upcycling.plan import plan_upcycling

    plan = plan_upcycling(source, num_experts=experts, moe_layers="all", verify=True, format="native")
    print(plan.summary(), file=sys.stderr)
    print(json.dumps(plan.as_dict()))


def train_worker(moe_dir: str, ep_size: int, fsdp_size: int, seq_len: int) -> None:
    """Runs on every rank under torchrun: load sharded, one AdamW step, one JSON line of measurements."""
    import psutil
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import hf_moe  # noqa: F401  (registers the architectures)

    torch.set_num_threads(1)
    baseline = psutil.Process().memory_info().rss
    distributed = DistributedConfig(fsdp_size=fsdp_size, ep_size=ep_size)
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32, distributed_config=distributed)
    model.train()
    loaded = psutil.Process().memory_info().rss

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    parameters = sum(local(p).numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)  # the same batch on every rank: only memory is measured
    input_ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, seq_len), generator=generator)
    start = time.perf_counter()
    peaks = {"load": peak_rss()}
    loss = model(input_ids=input_ids, labels=input_ids).loss
    peaks["forward"] = peak_rss()
    loss.backward()
    peaks["backward"] = peak_rss()
    gradients = sum(local(p.grad).numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    peaks["step"] = peak_rss()
    seconds = time.perf_counter() - start
    states = sum(
        local(v).numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    record = {
        "rank": dist.get_rank(),
        "loss": loss.item(),
        "seconds": seconds,
        "baseline_rss": baseline,
        "rss_after_load": loaded,
        "peak_rss": peak_rss(),
        "peak_rss_after": peaks,
        "local_parameters": parameters,
        "gradient_bytes": gradients,
        "optimizer_bytes": states,
    }
    print("RANK_JSON " + json.dumps(record), flush=True)
    dist.destroy_process_group()


def measure_training(workdir: Path, layers: int, vocab: int, experts: int, ep_size: int, fsdp_size: int) -> dict:
    """The MoE checkpoint (streamed, as the conversion run), then one step under torchrun on CPU."""
    from hf_moe import upcycle_checkpoint
    from hf_moe.upcycling.plan import plan_upcycling

    config = dense_config(layers, vocab)
    source, moe = workdir / "dense", workdir / "moe"
    write_dense_checkpoint(source, config)
    upcycle_checkpoint(source, moe, num_experts=experts, moe_layers="all", progress=False)
    plan = plan_upcycling(config, num_experts=experts, moe_layers="all", ep_size=ep_size, fsdp_size=fsdp_size)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(fsdp_size), __file__,
        "--train-worker", str(moe), str(ep_size), str(fsdp_size), str(TRAIN_SEQ_LEN),
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}")
    ranks = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("RANK_JSON ")]
    return {
        "layers": layers,
        "vocab_size": vocab,
        "num_experts": experts,
        "ep_size": ep_size,
        "fsdp_size": fsdp_size,
        "seq_len": TRAIN_SEQ_LEN,
        "seconds": time.perf_counter() - start,
        "plan": {**plan.training.__dict__, "total": plan.training.total, "total_parameters": plan.total_parameters},
        "ranks": sorted(ranks, key=lambda r: r["rank"]),
    }


def training_rows(report: dict) -> list[list[str]]:
    plan = report["plan"]
    rows = []
    for rank in report["ranks"]:
        pairs = [
            ("parameters", plan["sharded_parameters"], rank["local_parameters"], 1),
            ("gradients", plan["gradients"], rank["gradient_bytes"], 1e9),
            ("AdamW states", plan["optimizer"], rank["optimizer_bytes"], 1e9),
            ("peak RSS - baseline", plan["total"], rank["peak_rss"] - rank["baseline_rss"], 1e9),
        ]
        for name, p, m, unit in pairs:
            shown = [f"{v:,}" if unit == 1 else f"{v / unit:.3f} GB" for v in (p, m)]
            rows.append([str(rank["rank"]), name, *shown, f"{m / p:.3f}"])
    return rows


def run_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-4000:]}")
    sys.stderr.write(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def measure(workdir: Path, layers: int, vocab: int, experts: int) -> dict:
    source, moe, native = workdir / "dense", workdir / "moe", workdir / "native"
    start = time.perf_counter()
    source_bytes = write_dense_checkpoint(source, dense_config(layers, vocab))
    dense_seconds = time.perf_counter() - start
    plan = run_child("--plan-worker", str(source), str(experts))
    os.sync()
    upcycle = run_child(
        "--worker", "upcycle", str(source), str(moe), "--num-experts", str(experts), "--moe-layers", "all",
        "--verify", "--no-progress",
    )  # fmt: skip
    upcycle |= {"disk_bytes": folder_bytes(moe), "weight_file_bytes": folder_bytes(moe, "*.safetensors")}
    os.sync()
    export = run_child("--worker", "export", str(moe), str(native), "--no-progress")
    export |= {"disk_bytes": folder_bytes(native), "weight_file_bytes": folder_bytes(native, "*.safetensors")}
    config = json.loads((moe / "config.json").read_text())
    return {
        "layers": layers,
        "vocab_size": vocab,
        "num_experts": experts,
        "dense_bytes": source_bytes,
        "dense_write_seconds": dense_seconds,
        "plan": plan,
        "upcycle": upcycle,
        "export": export,
        "verification": config["upcycling"].get("verification"),
    }


def comparison_rows(report: dict) -> list[list[str]]:
    plan, upcycle, export = report["plan"], report["upcycle"], report["export"]
    stages = plan["conversion_stages"]
    baseline = plan["baseline_bytes"]
    upcycle_stages = [n for s, n in stages.items() if not s.startswith("export")]
    export_stages = [n for s, n in stages.items() if s.startswith("export")]
    pairs = [
        ("upcycle peak RSS", baseline + max(upcycle_stages), upcycle["peak_rss"]),
        ("upcycle weight files", plan["weight_file_bytes"], upcycle["weight_file_bytes"]),
        ("export peak RSS", baseline + max(export_stages), export["peak_rss"]),
        ("export weight files", plan["weight_file_bytes"], export["weight_file_bytes"]),
    ]
    return [[name, f"{p / 1e9:.3f} GB", f"{m / 1e9:.3f} GB", f"{m / p:.3f}"] for name, p, m in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=QWEN3_0_6B["num_hidden_layers"], help="decoder layers (28)")
    parser.add_argument("--vocab", type=int, default=QWEN3_0_6B["vocab_size"], help="vocabulary size (151936)")
    parser.add_argument("--experts", type=int, default=8, help="experts in every layer (8)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (in --workdir)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument(
        "--train",
        nargs=2,
        type=int,
        metavar=("EP_SIZE", "FSDP_SIZE"),
        help="instead: one AdamW training step of the MoE (use --layers 2) under torchrun on CPU (gloo) with "
        "DistributedConfig(ep_size, fsdp_size), FSDP_SIZE processes; each rank's memory next to the plan",
    )
    parser.add_argument("--plan-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--train-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.plan_worker:
        return plan_worker(args.plan_worker[0], int(args.plan_worker[1]))
    if args.train_worker:
        return train_worker(args.train_worker[0], *map(int, args.train_worker[1:]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    scratch = Path(tempfile.mkdtemp(prefix="scale_check.", dir=args.workdir))
    try:
        if args.train:
            report = measure_training(scratch, args.layers, args.vocab, args.experts, *args.train)
        else:
            report = measure(scratch, args.layers, args.vocab, args.experts)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    report["environment"] = environment_lines(torch.device("cpu"))
    if args.train:
        print("\n".join(report["environment"]))
        print(
            f"\none AdamW step, float32, batch 1 x {report['seq_len']} tokens, {report['fsdp_size']} processes "
            f"(ep_size={report['ep_size']}, fsdp_size={report['fsdp_size']}), {report['seconds']:.0f} s with loading; "
            f"{args.layers} layers of Qwen3-0.6B's width, vocabulary {args.vocab}, {args.experts} experts in every "
            f"layer ({report['plan']['total_parameters'] / 1e9:.3f}B parameters). The plan's peak counts weights, "
            "gradients, AdamW states and the FSDP all-gather, not activations\n"
        )
        print(markdown_table(["rank", "quantity", "plan", "measured", "measured / plan"], training_rows(report)))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return None
    rows = comparison_rows(report)
    report["ratios"] = {row[0]: float(row[3]) for row in rows}
    plan = report["plan"]
    print("\n".join(report["environment"]))
    print(
        f"\nqwen3, Qwen3-0.6B width, {args.layers} layers, vocabulary {args.vocab}: dense "
        f"{report['dense_bytes'] / 1e9:.2f} GB bfloat16 -> {args.experts} experts in every layer, "
        f"{plan['total_parameters'] / 1e9:.3f}B parameters ({plan['active_parameters'] / 1e9:.3f}B active per token)\n"
    )
    print(markdown_table(["quantity", "plan", "measured", "measured / plan"], rows))
    print(
        f"\nupcycle --verify: {report['upcycle']['seconds']:.0f} s, output folder "
        f"{report['upcycle']['disk_bytes'] / 1e9:.3f} GB; export: {report['export']['seconds']:.0f} s, output folder "
        f"{report['export']['disk_bytes'] / 1e9:.3f} GB; whole-model verification: "
        f"{plan['model_comparison'] or 'run'}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
