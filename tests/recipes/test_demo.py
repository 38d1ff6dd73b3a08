"""The end-to-end demo (README command 1): dense LM -> upcycled Switch MoE -> fine-tuned through the CLM recipe."""

import json
import os
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard
from recipe_helpers import REPO


def run_demo(output_dir, *args: str) -> subprocess.CompletedProcess:
    # FutureWarnings are errors, in the demo and the recipe runs it launches: the demo's settings must use
    # current names (TRL's default gradient_checkpointing=True warned "deprecated ... activation_checkpointing").
    environment = {**os.environ, "PYTHONWARNINGS": "error::FutureWarning"}
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "demo.py"), "--output_dir", str(output_dir), *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def check_outputs(output_dir, result) -> dict:
    report = json.loads((output_dir / "demo_report.json").read_text())
    # Copies of the dense MLP with renormalised top-2 gates and dropless evaluation: the upcycled
    # model at step 0 computes the dense function.
    assert report["upcycled_step0_validation_perplexity"] == pytest.approx(
        report["dense_validation_perplexity"], rel=1e-4
    )
    assert result.stdout.strip().splitlines()[-2].endswith(f"Output folder: {output_dir.resolve()}")
    finetuned = output_dir / "switch_finetuned"
    for name in ("README.md", "expert_load.png", "loss_curves.png", "model.safetensors", "tokenizer.json"):
        assert (finetuned / name).is_file(), name
    assert ModelCard.load(finetuned / "README.md").data.eval_results
    settings = (finetuned / "finetune_config.yaml").read_text()
    assert "expert_dropout: 0.0" in settings and "router_z_loss_coef: 0.001" in settings
    # The dense control: the dense model fine-tuned by the same recipe, printed next to the MoE.
    assert (output_dir / "dense_control" / "model.safetensors").is_file()
    assert report["dense_control_validation_perplexity"] > 1 and report["dense_control_tokens_per_second"] > 0
    assert "dense control, same fine-tuning" in result.stdout
    return report


def test_demo_small(tmp_path):
    """The demo's whole path at a tiny size (about a minute)."""
    result = run_demo(
        tmp_path / "demo",
        "--dense_steps",
        "6",
        "--finetune_steps",
        "4",
        "--train_chars",
        "40000",
        "--validation_chars",
        "8000",
        "--hidden_size",
        "32",
        "--vocab_size",
        "300",
    )
    check_outputs(tmp_path / "demo", result)
    # A second run over the same folder is refused unless asked to overwrite.
    again = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "demo.py"), "--output_dir", str(tmp_path / "demo")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode != 0 and "holds the results of an earlier demo run; pass --overwrite" in again.stderr


@pytest.mark.slow
def test_demo_as_in_the_readme(tmp_path):
    """The README command as is: under 10 minutes on 2 CPU cores, and fine-tuning lowers perplexity."""
    result = run_demo(tmp_path / "demo")
    report = check_outputs(tmp_path / "demo", result)
    assert report["finetuned_validation_perplexity"] < report["upcycled_step0_validation_perplexity"]
    assert report["minutes"] < 10
