"""Both recipes under ``accelerate launch`` on CPU, with one process and with two (DDP, gloo).

Each launched run is shared by the assertions about it (module-scoped fixtures).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from recipe_helpers import (
    REPO,
    classification_settings,
    clm_settings,
    eval_records,
    launch_recipe,
    train_records,
    write_settings,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_moe  # noqa: F401  (registers the architectures for the Auto classes)

# Same examples per optimizer step in both set-ups (8), dropout off and no load-balancing loss
# (computed per process batch, it is not linear in the batch), so the runs must agree.
EQUIVALENCE = {"router_aux_loss_coef": 0.0, "max_steps": 6, "eval_steps": 3, "report_to": "tensorboard"}


@pytest.fixture(scope="module")
def clm_runs(assets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clm_launch")
    one = launch_recipe(
        "finetune_clm",
        clm_settings(
            assets, root / "one", per_device_train_batch_size=8, save_strategy="steps", save_steps=6, **EQUIVALENCE
        ),
        root,
        "one_process.yaml",
        launch_args=["--mixed_precision", "no"],
    )
    two = launch_recipe(
        "finetune_clm",
        clm_settings(assets, root / "two", per_device_train_batch_size=4, **EQUIVALENCE),
        root,
        "data_parallel.yaml",
        launch_args=["--mixed_precision", "no"],
    )
    assert "1 process(es), NO, mixed precision no, MoE" in one.stdout
    assert "2 process(es), MULTI_CPU, mixed precision no, MoE" in two.stdout  # really two processes in one gloo group
    return {"one": root / "one", "two": root / "two"}


@pytest.fixture(scope="module")
def classification_runs(assets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classification_launch")
    # bf16 autocast (this CPU has AVX512-BF16).
    one = launch_recipe(
        "finetune_classification",
        classification_settings(
            assets, root / "one", max_steps=10, eval_steps=5, backbone_dropout=0.1, expert_dropout=0.4, bf16=True
        ),
        root,
        "one_process.yaml",
    )
    assert "1 process(es), NO, mixed precision bf16, MoE" in one.stdout
    launch_recipe(
        "finetune_classification",
        classification_settings(assets, root / "two", per_device_train_batch_size=4, max_steps=10, eval_steps=5),
        root,
        "data_parallel.yaml",
    )
    return {"one": root / "one", "two": root / "two"}


@pytest.mark.parametrize("setup", ["one", "two"])
def test_clm_loss_falls_and_output_loads(clm_runs, setup):
    out = clm_runs[setup]
    losses = [r["loss"] for r in train_records(out)]
    evaluations = eval_records(out)
    assert [r["step"] for r in evaluations] == [0, 3, 6]
    first, last = evaluations[0]["eval_validation_task_loss"], evaluations[-1]["eval_validation_task_loss"]
    assert last < first - 0.1 and losses[-1] < losses[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, hf_moe.SwitchMoeForCausalLM)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert (out / "tokenizer.json").is_file() and (out / "finetune_config.yaml").is_file()
    assert (out / "checkpoint-6" / "checkpoint_complete").is_file() or setup == "two"
    assert list(out.glob("**/events.out.tfevents.*")), "TensorBoard logs"


@pytest.mark.parametrize("setup", ["one", "two"])
def test_clm_card_front_matter_parses(clm_runs, setup):
    card = ModelCard.load(clm_runs[setup] / "README.md")
    assert card.data.base_model.endswith("switch") and "switch_moe" in card.data.tags
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert set(metrics) == {"loss", "perplexity"}
    assert metrics["loss"] == pytest.approx(eval_records(clm_runs[setup])[-1]["eval_validation_task_loss"], abs=1e-5)
    assert (clm_runs[setup] / "expert_load.png").stat().st_size > 1000
    assert "## Routing health" in card.text and "Best step" in card.text


def test_two_processes_match_one_process_with_twice_the_batch(clm_runs):
    one, two = (
        load_file(str(clm_runs["one"] / "model.safetensors")),
        load_file(str(clm_runs["two"] / "model.safetensors")),
    )
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
    losses_one = [r["loss"] for r in train_records(clm_runs["one"])]
    losses_two = [r["loss"] for r in train_records(clm_runs["two"])]
    assert losses_two == pytest.approx(losses_one, abs=1e-5)


@pytest.mark.parametrize("setup", ["one", "two"])
def test_classification_loss_falls_and_output_loads(classification_runs, setup):
    out = classification_runs[setup]
    evaluations = eval_records(out)
    assert evaluations[-1]["eval_validation_task_loss"] < evaluations[0]["eval_validation_task_loss"]
    assert evaluations[-1]["eval_validation_accuracy"] >= 0.75
    assert "eval_validation_perplexity" not in evaluations[-1]  # a classifier has no perplexity
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert isinstance(model, hf_moe.SwitchMoeForSequenceClassification)
    assert model.config.text_config.id2label == {0: "negative", 1: "positive"}
    card = ModelCard.load(out / "README.md")
    assert {r.metric_type for r in card.data.eval_results} == {"loss", "accuracy", "f1"}
    assert card.data.pipeline_tag == "text-classification"


def test_classification_settings_reach_the_saved_model(classification_runs):
    config = AutoModelForSequenceClassification.from_pretrained(classification_runs["one"]).config
    assert config.expert_dropout == 0.4 and config.text_config.attention_dropout == 0.1


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="on GPUs FSDP2 runs: see test_fsdp2_trains_and_saves")
def test_fsdp2_without_gpus_fails_at_start_with_a_clear_message(assets, tmp_path):
    settings = clm_settings(assets, tmp_path / "out", max_steps=2)
    result = launch_recipe("finetune_clm", settings, tmp_path, "fsdp2.yaml", check=False)
    assert result.returncode != 0
    assert "accelerate enables FSDP only on GPUs (or other accelerators), not for CPU processes" in result.stderr
    assert "on CPUs shard with distributed_config" in result.stderr
    assert not (tmp_path / "out" / "trainer_state.json").exists()


@pytest.mark.skipif(
    torch.cuda.device_count() < 1,
    reason=(
        "accelerate's FSDP2 needs a GPU: accelerate 1.15/1.16 turns FSDP on only for accelerator devices "
        "(AcceleratorState keeps MULTI_CPU as plain DDP); no GPU on this machine. On CPUs FSDP2 runs through "
        "distributed_config: see test_sharded_on_cpu_trains_as_one_process_with_global_balancing"
    ),
)
def test_fsdp2_trains_and_saves(assets, tmp_path):
    processes = min(torch.cuda.device_count(), 2)
    settings = clm_settings(assets, tmp_path / "out", max_steps=4, eval_steps=2)
    launch_recipe("finetune_clm", settings, tmp_path, "fsdp2.yaml", launch_args=["--num_processes", str(processes)])
    evaluations = eval_records(tmp_path / "out")
    assert evaluations[-1]["eval_validation_task_loss"] < evaluations[0]["eval_validation_task_loss"]
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), hf_moe.SwitchMoeForCausalLM)


# Sharded at load time by transformers' engine (FSDP2 and expert parallelism through `distributed_config`),
# which runs on CPU processes with gloo, with the balancing loss over the global batch: with the same
# examples per step the run must train exactly as one process does, router terms included.
SHARDED = {"router_aux_loss_coef": 0.01, "balance_scope": "global_batch", "max_steps": 6, "eval_steps": 3}
# FSDP2 alone, and expert parallelism (each process holds half of the experts) with FSDP2.
SHARDINGS = {"fsdp": {"fsdp_size": 2}, "ep_fsdp": {"ep_size": 2, "fsdp_size": 2}}


def torchrun_recipe(name: str, settings: dict, tmp_path, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N recipes/<name>.py --config ...``, the command recipes/README.md gives."""
    config_file = write_settings(Path(tmp_path) / f"{name}_{Path(settings['output_dir']).name}_torchrun.yaml", settings)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command += [str(REPO / "recipes" / f"{name}.py"), "--config", config_file]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def sharded_runs(assets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clm_sharded")
    launch_recipe(
        "finetune_clm",
        clm_settings(assets, root / "one", per_device_train_batch_size=8, **SHARDED),
        root,
        "one_process.yaml",
        launch_args=["--mixed_precision", "no"],
    )
    runs = {"one": root / "one"}
    for setup, distributed_config in SHARDINGS.items():
        settings = clm_settings(
            assets, root / setup, per_device_train_batch_size=4, distributed_config=distributed_config, **SHARDED
        )
        result = torchrun_recipe("finetune_clm", settings, root)
        start_line = f"2 process(es), MULTI_CPU, mixed precision no, MoE, sharded at load time {distributed_config}"
        assert start_line in result.stdout
        runs[setup] = root / setup
    return runs


@pytest.mark.parametrize("setup", list(SHARDINGS))
def test_sharded_on_cpu_trains_as_one_process_with_global_balancing(sharded_runs, setup):
    one, sharded = (load_file(str(sharded_runs[s] / "model.safetensors")) for s in ("one", setup))
    assert set(sharded) == set(one)
    for name in one:
        torch.testing.assert_close(sharded[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
    records = {s: train_records(sharded_runs[s]) for s in ("one", setup)}
    for key in ("loss", "aux_loss"):  # the balancing loss of 2 processes is the one of the whole batch
        assert [r[key] for r in records[setup]] == pytest.approx([r[key] for r in records["one"]], abs=1e-5)
    assert records[setup][-1]["loss"] < records[setup][0]["loss"]


@pytest.mark.parametrize("setup", list(SHARDINGS))
def test_sharded_on_cpu_saves_a_model_that_loads_in_one_process(sharded_runs, setup):
    out = sharded_runs[setup]
    # The folder carries hf_moe's code (not torch's FSDP wrapper class) and no sharding settings.
    assert (out / "modeling_moe.py").is_file() and not list(out.glob("_fsdp*.py"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, hf_moe.SwitchMoeForCausalLM)
    assert model.config.auto_map["AutoModelForCausalLM"] == "switch.SwitchMoeForCausalLM"
    assert getattr(model.config, "distributed_config", None) is None
    reference = AutoModelForCausalLM.from_pretrained(sharded_runs["one"])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
