"""The benchmarks' --quick modes run end to end and print the tables the README promises."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_quick(script: str) -> list[list[str]]:
    """Rows of the markdown table the script prints, as lists of cells."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_layer_benchmark_reports_every_layer_against_the_reference():
    rows = run_quick("bench_layer.py")
    layers = [row[2] for row in rows]
    assert layers == [
        "dense SwiGLU on 1x256 rows (reference)",
        "dense SwiGLU on 2x256 rows (reference)",
        "hf_moe top-1 dropless",
        "hf_moe top-1 capacity 1.25",
        "Mixtral top-1 grouped_mm",
        "Mixtral top-1 eager",
        "SwitchTransformers top-1",
        "hf_moe top-2 dropless",
        "hf_moe expert choice c=2",
        "Mixtral top-2 grouped_mm",
        "Mixtral top-2 eager",
        "dense SwiGLU, bf16 autocast",
        "hf_moe top-1 dropless, bf16 autocast",
        "Mixtral top-1 grouped_mm, bf16 autocast",
    ]
    for row in rows[:2]:  # the references are their own unit
        assert row[4] == row[6] == row[9] == row[11] == "1.00x"
    for row in rows:
        assert float(row[3]) > 0 and float(row[5]) > 0
        assert float(row[8]) > 0  # every layer allocates during forward+backward


def test_model_benchmark_compares_upcycled_models_with_the_dense_backbone():
    rows = run_quick("bench_model.py")
    assert [row[0] for row in rows] == [
        "dense llama (reference)",
        "hf_moe top-1 dropless, 8 experts every other layer",
        "hf_moe top-1 capacity 1.25, 8 experts every other layer",
    ]
    assert rows[0][3] == rows[0][5] == rows[0][7] == "1.00x"
    dense_params, moe_params = float(rows[0][1]), float(rows[1][1])
    assert moe_params > dense_params  # experts add parameters
