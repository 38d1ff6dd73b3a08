"""benchmarks/serve_check.py builds its native models and compares engine answers token by token."""

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("serve_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_reports_the_first_differing_step_and_logprob_gap():
    compare = load_script().compare
    reference = [{"tokens": [5, 6, 7], "logprobs": [-0.1, -0.2, -0.3]}, {"tokens": [8, 9], "logprobs": [-1.0, -2.0]}]
    same = compare(reference, [{"tokens": [5, 6, 7], "logprobs": [-0.1, -0.25, -0.3]}, reference[1]])
    assert same["greedy_equal"] and abs(same["max_abs_logprob_diff"] - 0.05) < 1e-9
    differ = compare(reference, [reference[0], {"tokens": [8, 4], "logprobs": [-1.5, -2.0]}])
    assert not differ["greedy_equal"] and differ["first_difference"] == "prompt 1, step 1"
    assert differ["max_abs_logprob_diff"] == 0.5  # steps after the first differing token are not compared


def test_without_engines_it_builds_the_models_and_says_what_it_skipped(tmp_path):
    command = [
        sys.executable,
        str(SCRIPT),
        "--workdir",
        str(tmp_path),
        "--cases",
        "qwen3 -> qwen3_moe, MoE",
        "mixtral, ",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped (not given): vllm, llama.cpp" in result.stdout
    native = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith("-dense"))
    assert len(native) == 3 and all((tmp_path / name / "tokenizer.json").is_file() for name in native)


def test_fine_grained_cases_export_the_experts_width(tmp_path):
    import json

    command = [sys.executable, str(SCRIPT), "--workdir", str(tmp_path), "--cases", "fine-grained"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    configs = {
        p.name: json.loads((p / "config.json").read_text())
        for p in tmp_path.iterdir()
        if p.is_dir() and not p.name.endswith("-dense")
    }
    fields = sorted(
        (c["model_type"], c.get("moe_intermediate_size") or c["intermediate_size"], c["num_experts_per_tok"])
        for c in configs.values()
    )
    assert fields == [("mixtral", 256, 4), ("qwen3_moe", 128, 8), ("qwen3_moe", 256, 4)]
    assert sorted(c["hf_moe_export"]["upcycling"]["granularity"] for c in configs.values()) == [2, 2, 4]


def test_a_failed_engine_is_reported_by_its_error_line_not_a_trailing_warning():
    error_line = load_script().error_line
    log = (
        "INFO loading\n(Worker pid=7) ERROR RuntimeError: shape mismatch in shared_experts\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
        "/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: leaked semaphore objects\n"
    )
    assert error_line(log, 1) == "RuntimeError: Engine core initialization failed. See root cause above."
    assert error_line("only a warning\n", 1) == "only a warning"
    assert error_line("", -9) == "exit status -9"
