"""Peak memory of a directory conversion does not grow with the checkpoint size.

Runs benchmarks/bench_upcycle.py, which converts synthetic llama checkpoints whose layers all
have the same shapes (only the layer count grows) in fresh subprocesses and reports each one's
peak RSS.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_upcycle.py"


def run_benchmark(sizes_mb, tmp_path) -> dict:
    report_path = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARK),
            "--sizes-mb",
            *map(str, sizes_mb),
            "--json",
            str(report_path),
            "--workdir",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(report_path.read_text())


def check_flat(report: dict) -> None:
    small, large = report["results"]
    assert large["source_bytes"] > 3.5 * small["source_bytes"]
    # the largest tensor written is a stacked expert weight: num_experts x the largest dense tensor
    largest_written_mb = report["num_experts"] * small["largest_dense_tensor_mb"]
    for row in (small, large):
        assert row["peak_above_imports_mb"] < 4 * largest_written_mb, row
    # holding the model would add ~1 MB per MB of checkpoint
    assert report["peak_rss_growth_per_source_mb"] < 0.05, report


def test_peak_memory_is_flat_50mb_vs_200mb(tmp_path):
    check_flat(run_benchmark([50, 200], tmp_path))


@pytest.mark.slow
def test_peak_memory_is_flat_200mb_vs_800mb(tmp_path):
    check_flat(run_benchmark([200, 800], tmp_path))
