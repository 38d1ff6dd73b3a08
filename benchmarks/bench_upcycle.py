"""Upcycling benchmark: peak memory must not grow with model size; throughput vs a plain copy.

    python benchmarks/bench_upcycle.py                      # 200 MB and 800 MB synthetic llama checkpoints
    python benchmarks/bench_upcycle.py --sizes-mb 50 200 --json results.json

For each size it writes a synthetic dense llama checkpoint whose layers all have the same shapes
(so the largest tensor is the same at every size; only the number of layers grows), converts it
with `upcycle_checkpoint` in a fresh subprocess, and reports that process' peak RSS (above the
RSS right after the imports), the conversion time, and the time to copy the same output bytes
with `shutil.copyfile` measured in the same run (the I/O floor of any converter). Dirty pages are
flushed (``os.sync``) before each timed step; reads come from a warm page cache.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment_lines, markdown_table  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 512, 1408, 2048, 8
NUM_EXPERTS = 4


def layer_bytes() -> int:
    attention = 4 * HIDDEN * HIDDEN
    mlp = 3 * HIDDEN * INTERMEDIATE
    return 4 * (attention + mlp + 2 * HIDDEN)


def write_synthetic_checkpoint(folder: Path, size_mb: float) -> int:
    """A random float32 llama checkpoint of about ``size_mb`` MB, one shard per layer; returns its bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    embeddings = 2 * 4 * VOCAB * HIDDEN
    num_layers = max(2, round((size_mb * 1e6 - embeddings) / layer_bytes()))
    folder.mkdir(parents=True)
    LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=VOCAB,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.02

    shards = [
        {
            "model.embed_tokens.weight": rand(VOCAB, HIDDEN),
            "lm_head.weight": rand(VOCAB, HIDDEN),
            "model.norm.weight": rand(HIDDEN),
        }
    ]
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shard = {p + f"self_attn.{n}_proj.weight": rand(HIDDEN, HIDDEN) for n in "qkvo"}
        shard |= {
            p + "mlp.gate_proj.weight": rand(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": rand(INTERMEDIATE, HIDDEN),
        }
        shard |= {p + "mlp.down_proj.weight": rand(HIDDEN, INTERMEDIATE)}
        shard |= {p + "input_layernorm.weight": rand(HIDDEN), p + "post_attention_layernorm.weight": rand(HIDDEN)}
        shards.append(shard)
    weight_map, total = {}, 0
    for index, shard in enumerate(shards):
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def peak_rss() -> int:
    """This process' peak resident memory in bytes.

    VmHWM belongs to the process' own address space; ``ru_maxrss`` would not do, since Linux
    carries it across fork and exec, so a child would report its parent's peak.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def worker(source: str, output: str) -> None:
    """Runs in the measured subprocess: convert, then print one JSON line of measurements."""
    import psutil

    from hf_moe import upcycle_checkpoint

    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    upcycle_checkpoint(
        source, output, num_experts=NUM_EXPERTS, moe_layers="every_other", max_shard_size="500MB", progress=False
    )
    seconds = time.perf_counter() - start
    peak = peak_rss()
    written = sum(p.stat().st_size for p in Path(output).glob("*.safetensors"))
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak, "seconds": seconds, "bytes_written": written}))


def copy_seconds(folder: Path, destination: Path) -> float:
    destination.mkdir()
    start = time.perf_counter()
    for path in sorted(folder.glob("*.safetensors")):
        shutil.copyfile(path, destination / path.name)
    return time.perf_counter() - start


def measure(size_mb: float, workdir: Path) -> dict:
    source, output = workdir / f"dense-{size_mb:g}MB", workdir / f"moe-{size_mb:g}MB"
    source_bytes = write_synthetic_checkpoint(source, size_mb)
    os.sync()  # flush the writes of the previous step so they do not slow down the timed one
    result = subprocess.run(
        [sys.executable, __file__, "--worker", str(source), str(output)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"conversion of {size_mb} MB failed:\n{result.stderr[-3000:]}")
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    os.sync()
    plain_copy = copy_seconds(output, workdir / f"copy-{size_mb:g}MB")
    shutil.rmtree(source)
    shutil.rmtree(output)
    shutil.rmtree(workdir / f"copy-{size_mb:g}MB")
    written = numbers["bytes_written"]
    return {
        "size_mb": size_mb,
        "source_bytes": source_bytes,
        "bytes_written": written,
        "peak_rss_mb": numbers["peak_rss"] / 1e6,
        "rss_after_imports_mb": numbers["baseline_rss"] / 1e6,
        "peak_above_imports_mb": (numbers["peak_rss"] - numbers["baseline_rss"]) / 1e6,
        "largest_dense_tensor_mb": 4 * INTERMEDIATE * HIDDEN / 1e6,
        "convert_seconds": numbers["seconds"],
        "convert_mb_per_s": written / 1e6 / numbers["seconds"],
        "copy_mb_per_s": written / 1e6 / plain_copy,
        "convert_vs_copy_time": numbers["seconds"] / plain_copy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes-mb", type=float, nargs="+", default=[200, 800], help="synthetic checkpoint sizes (default 200 800)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--worker", nargs=2, metavar=("SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        rows = [measure(size, Path(scratch)) for size in args.sizes_mb]
    report = {"environment": environment_lines(torch.device("cpu")), "num_experts": NUM_EXPERTS, "results": rows}
    print("\n".join(report["environment"]))
    print(f"synthetic llama checkpoints, {NUM_EXPERTS} experts in every other layer, float32, warm page cache\n")
    headers = [
        "source MB",
        "written MB",
        "peak RSS MB",
        "peak above imports MB",
        "convert MB/s",
        "copy MB/s",
        "time vs copy",
    ]
    table = [
        [
            f"{r['source_bytes'] / 1e6:.0f}",
            f"{r['bytes_written'] / 1e6:.0f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['peak_above_imports_mb']:.1f}",
            f"{r['convert_mb_per_s']:.0f}",
            f"{r['copy_mb_per_s']:.0f}",
            f"{r['convert_vs_copy_time']:.1f}x",
        ]
        for r in rows
    ]
    print(markdown_table(headers, table))
    if len(rows) > 1:
        growth = (rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]) / (
            (rows[-1]["source_bytes"] - rows[0]["source_bytes"]) / 1e6
        )
        report["peak_rss_growth_per_source_mb"] = growth
        print(f"peak RSS grows by {growth:.3f} MB per MB of checkpoint (0 = flat; 1 = holds the whole model)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
