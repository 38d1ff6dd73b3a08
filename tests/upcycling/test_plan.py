"""`plan_upcycling` / `hf-moe upcycle --plan`: parameters, disk and memory from the config alone.

The counts are checked against a real upcycled model, the disk size against a real conversion's
files, the memory model against measured conversions (benchmarks/scale_check.py, in fresh processes).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_CONFIGS, tiny_config, tiny_dense

from hf_moe import upcycle_checkpoint, upcycle_model
from hf_moe.cli import main
from hf_moe.upcycling.plan import plan_upcycling

SCALE_CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "scale_check.py"


def mlp_parameters(model_type: str) -> int:
    fields = TINY_CONFIGS[model_type]
    return 3 * fields["hidden_size"] * fields["intermediate_size"]  # gate, up, down; no biases


@pytest.mark.parametrize("model_type", ["qwen3", "llama", "gemma3_text"])
def test_total_parameters_equal_the_upcycled_model(model_type):
    dense = tiny_dense(model_type)
    moe = upcycle_model(dense, num_experts=4, moe_layers="every_other")
    plan = plan_upcycling(dense.config, num_experts=4, moe_layers="every_other")
    assert plan.total_parameters == sum(p.numel() for p in moe.parameters())
    assert plan.expert_parameters == sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)


def test_active_parameters_by_hand():
    """Active per token: the dense model, plus per MoE layer a router and k - 1 more MLPs (token choice),
    or capacity_factor - 1 more on average (expert choice)."""
    dense = tiny_dense("qwen3")
    dense_total = sum(p.numel() for p in dense.parameters())
    hidden, mlp, experts = TINY_CONFIGS["qwen3"]["hidden_size"], mlp_parameters("qwen3"), 4
    moe_layers = [0, 2]
    token_choice = plan_upcycling(dense.config, num_experts=experts, moe_layers=moe_layers, num_experts_per_tok=3)
    assert token_choice.active_parameters == dense_total + len(moe_layers) * (2 * mlp + experts * hidden)
    assert token_choice.total_parameters == dense_total + len(moe_layers) * (3 * mlp + experts * hidden)
    expert_choice = plan_upcycling(
        dense.config, routing="expert_choice", num_experts=experts, moe_layers=moe_layers, capacity_factor=2.0
    )
    assert expert_choice.active_parameters == dense_total + len(moe_layers) * (1 * mlp + experts * hidden)


@pytest.mark.parametrize(("dtype", "shard"), [(None, "5GB"), ("bfloat16", "5GB"), (None, "40KB")])
def test_disk_size_equals_the_written_files(save_dense, tmp_path, dtype, shard):
    _, source = save_dense("qwen3")
    output = tmp_path / "moe"
    upcycle_checkpoint(
        source, output, num_experts=4, moe_layers="all", dtype=dtype, max_shard_size=shard, progress=False
    )
    plan = plan_upcycling(source, num_experts=4, moe_layers="all", dtype=dtype, max_shard_size=shard)
    files = sorted(output.glob("*.safetensors"))
    assert plan.shards == len(files) and (len(files) > 1) == (shard == "40KB")
    assert plan.weight_file_bytes == sum(f.stat().st_size for f in files)
    index = output / "model.safetensors.index.json"
    if index.exists():
        assert plan.disk_bytes == json.loads(index.read_text())["metadata"]["total_size"]
    assert list(plan.disk_bytes_by_dtype) == [dtype or "float32"]


def test_training_memory_shards_everything_over_fsdp_and_gathers_local_experts():
    config = tiny_config("qwen3")
    single = plan_upcycling(config, num_experts=4, moe_layers="all").training
    total = plan_upcycling(config, num_experts=4, moe_layers="all").total_parameters
    assert (single.weights, single.gradients, single.optimizer, single.gathered) == (4 * total, 4 * total, 8 * total, 0)
    fsdp = plan_upcycling(config, num_experts=4, moe_layers="all", fsdp_size=2).training
    both = plan_upcycling(config, num_experts=4, moe_layers="all", fsdp_size=2, ep_size=2).training
    assert fsdp.sharded_parameters == both.sharded_parameters == -(-total // 2)
    assert fsdp.optimizer == 8 * fsdp.sharded_parameters
    # expert parallelism halves the experts a rank all-gathers, not its resident shard
    assert 0 < both.gathered < fsdp.gathered
    bf16 = plan_upcycling(config, num_experts=4, moe_layers="all", fsdp_size=2, train_dtype="bfloat16").training
    assert (bf16.weights, bf16.optimizer) == (fsdp.weights // 2, fsdp.optimizer)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"ep_size": 2, "fsdp_size": 3},
            "ep_size must divide fsdp_size (transformers' DistributedConfig requires it), got ep_size=2, fsdp_size=3",
        ),
        ({"fsdp_size": 0}, "fsdp_size must be an integer >= 1, got 0"),
        (
            {"ep_size": 3, "fsdp_size": 3},
            "ep_size must divide num_experts (each rank holds num_experts / ep_size experts), got ep_size=3, "
            "num_experts=4",
        ),
        ({"train_dtype": "int8"}, "train_dtype must be one of ['bfloat16', 'float16', 'float32'], got 'int8'"),
        ({"format": "gguf"}, "format must be one of ['hf_moe', 'native'], got 'gguf'"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError) as error:
        plan_upcycling(tiny_config("qwen3"), num_experts=4, **options)
    assert message in str(error.value)


def test_native_format_refuses_what_it_cannot_export():
    with pytest.raises(ValueError, match="--format native cannot write these settings natively"):
        plan_upcycling(tiny_config("gpt2"), num_experts=4, format="native")


def test_cli_plan_prints_and_writes_nothing(save_dense, tmp_path, capsys):
    _, source = save_dense("qwen3")
    output = tmp_path / "moe"
    argv = ["upcycle", str(source), str(output), "--num-experts", "4", "--moe-layers", "all", "--verify", "--plan"]
    assert main([*argv, "--ep-size", "2", "--fsdp-size", "2"]) == 0
    out = capsys.readouterr().out
    plan = plan_upcycling(source, num_experts=4, moe_layers="all", verify=True, ep_size=2, fsdp_size=2)
    assert f"Parameters: {plan.total_parameters:,} total" in out
    assert f"{plan.active_parameters:,} active per token" in out
    assert "verify layers:" in out and "fsdp_size=2, ep_size=2" in out
    assert not output.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--plan", "--ep-size", "2", "--fsdp-size", "3"],
            "--ep-size must divide --fsdp-size (transformers' DistributedConfig requires it), "
            "got --ep-size 2, --fsdp-size 3",
        ),
        (["--ep-size", "2"], "--ep-size applies to --plan only, got --ep-size 2 without --plan"),
    ],
)
def test_cli_plan_errors_name_the_flags(extra, message, save_dense, tmp_path, capsys):
    _, source = save_dense("qwen3")
    assert main(["upcycle", str(source), str(tmp_path / "moe"), "--no-progress", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()


def run_scale_check(tmp_path, *args) -> dict:
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, str(SCALE_CHECK), "--workdir", str(tmp_path), "--json", str(report), *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(report.read_text())


def check_agreement(report: dict, tolerance: float) -> None:
    for quantity, ratio in report["ratios"].items():
        assert 1 - tolerance <= ratio <= 1 + tolerance, (quantity, report["ratios"])
    assert report["upcycle"]["status"] == report["export"]["status"] == 0
    assert report["verification"]["passed"]


def test_memory_plan_matches_a_measured_conversion(tmp_path):
    """One layer of Qwen3-0.6B's width, 8 experts, a 4k vocabulary: upcycle --verify (whole models compared)
    in a fresh process; its peak RSS above its own baseline against the plan's largest stage, loosely
    (the allocator keeps some freed memory)."""
    sys.path.insert(0, str(SCALE_CHECK.parent))
    from scale_check import dense_config, write_dense_checkpoint

    source, output = tmp_path / "dense", tmp_path / "moe"
    write_dense_checkpoint(source, dense_config(layers=1, vocab=4000))
    options = ["--num-experts", "8", "--moe-layers", "all", "--verify", "--no-progress"]
    result = subprocess.run(
        [sys.executable, str(SCALE_CHECK), "--worker", "upcycle", str(source), str(output), *options],
        check=True,
        capture_output=True,
        text=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    plan = plan_upcycling(source, num_experts=8, moe_layers="all", verify=True, baseline_bytes=measured["baseline_rss"])
    assert plan.model_comparison is None and "verify model" in plan.conversion_stages
    working_set = measured["peak_rss"] - measured["baseline_rss"]
    assert 0.7 <= working_set / max(plan.conversion_stages.values()) <= 1.3, (working_set, plan.conversion_stages)
    assert plan.conversion_peak_bytes == pytest.approx(measured["peak_rss"], rel=0.2)


@pytest.mark.slow
def test_real_shape_conversion_matches_plan(tmp_path):
    """Qwen3-0.6B's shape (28 layers) upcycled to 8 experts in every layer, 2.45B parameters, with --verify, then
    exported to qwen3_moe: peak RSS and disk within 20% of the plan. About 10 GB of disk, many minutes on 2 cores."""
    report = run_scale_check(tmp_path)
    assert report["plan"]["total_parameters"] == 2_445_967_360
    check_agreement(report, tolerance=0.2)
    assert not list(tmp_path.glob("scale_check.*")), "the checkpoints must be deleted"


def test_scale_check_shape_is_qwen3_0_6b():
    """The benchmark's config has Qwen3-0.6B's published size: 596M parameters with tied embeddings."""
    sys.path.insert(0, str(SCALE_CHECK.parent))
    from scale_check import dense_config

    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(dense_config(28, 151936))
    assert sum(p.numel() for p in model.parameters()) == 596_049_920


@pytest.mark.slow
@pytest.mark.parametrize("ep_size", [1, 2])
def test_sharded_training_step_matches_plan(tmp_path, ep_size):
    """Two layers of the same shape, one AdamW step under torchrun with DistributedConfig(ep_size, fsdp_size=2)
    on CPU: each rank's parameter shard, gradients and AdamW states are the plan's exactly, its peak within 20%."""
    report = run_scale_check(tmp_path, "--layers", "2", "--train", str(ep_size), "2")
    plan = report["plan"]
    assert [rank["rank"] for rank in report["ranks"]] == [0, 1]
    for rank in report["ranks"]:
        assert rank["local_parameters"] == plan["sharded_parameters"]
        assert (rank["gradient_bytes"], rank["optimizer_bytes"]) == (plan["gradients"], plan["optimizer"])
        assert rank["peak_rss"] - rank["baseline_rss"] == pytest.approx(plan["total"], rel=0.2)
