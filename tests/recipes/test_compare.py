"""`hf-moe compare` / `hf_moe.compare_runs` on real tiny Trainer runs: the recipe's MoE run, its dense
control, and a plain `transformers.Trainer` run without `MoeCallback`; and its error paths."""

import json

import pytest
import torch
from datasets import Dataset
from recipe_helpers import clm_settings, run_recipe
from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments

from hf_moe import compare_runs
from hf_moe.cli import EXIT_USER_ERROR
from hf_moe.cli import main as cli_main
from hf_moe.compare import COMPARISON_PLOT, COMPARISON_TABLE, load_run, parameter_counts


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("compare_runs")
    folders = {"moe": root / "moe", "dense": root / "dense_control"}
    common = {"max_steps": 4, "eval_steps": 2, "logging_steps": 1}
    run_recipe("finetune_clm", clm_settings(assets, folders["moe"], **common), root)
    dense = clm_settings(
        assets, folders["dense"], model_name_or_path=assets["dense"], upcycle={"routing": "switch"}, dense_control=True
    )
    run_recipe("finetune_clm", {**dense, **common}, root)
    # A plain Trainer run: no hf_moe callback, no recipe.
    tokenizer = AutoTokenizer.from_pretrained(assets["dense"])
    ids = tokenizer(["the cat sat on the mat and then ate fish ."] * 8)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    folders["plain"] = root / "plain_trainer"
    torch.manual_seed(0)
    arguments = TrainingArguments(
        output_dir=str(folders["plain"]),
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=LlamaForCausalLM.from_pretrained(assets["dense"]), args=arguments, train_dataset=data, eval_dataset=data
    )
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    return folders


def table_rows(table: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in table.strip().splitlines()[2:]]
    return {row[0].strip(): [cell.strip() for cell in row[1:]] for row in rows}


def test_table_holds_each_runs_final_metrics_and_parameters(runs, tmp_path):
    table = compare_runs([runs["moe"], runs["dense"], runs["plain"]], tmp_path / "out")
    rows = table_rows(table)
    assert set(rows) == {"moe", "dense_control", "plain_trainer"}
    moe_state = json.loads((runs["moe"] / "trainer_state.json").read_text())["log_history"]
    last_eval = [r["eval_validation_task_loss"] for r in moe_state if "eval_validation_task_loss" in r][-1]
    steps, train, evaluation, best, perplexity, gap, seconds, tokens, params = rows["moe"]
    assert steps == "4"
    assert float(evaluation) == pytest.approx(last_eval, rel=1e-3)
    assert float(perplexity) == pytest.approx(torch.tensor(last_eval).exp().item(), rel=1e-3)
    assert gap != "–" and seconds != "–" and float(tokens) > 0
    # MoE: more parameters in total than active; dense: all active.
    total, active = (float(v.rstrip("M")) for v in params.split(" / "))
    assert total > active
    dense_total, dense_active = (float(v.rstrip("M")) for v in rows["dense_control"][-1].split(" / "))
    assert dense_total == dense_active
    # A plain Trainer run falls back to loss / eval_loss and has no timing from MoeCallback.
    plain = rows["plain_trainer"]
    plain_state = json.loads((runs["plain"] / "trainer_state.json").read_text())["log_history"]
    assert float(plain[2]) == pytest.approx([r["eval_loss"] for r in plain_state if "eval_loss" in r][-1], rel=1e-3)
    assert plain[6] == "–"
    assert (tmp_path / "out" / COMPARISON_TABLE).read_text() == table
    assert (tmp_path / "out" / COMPARISON_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*partial"))


def test_active_parameters_count_top_k_of_the_experts(runs):
    from safetensors.torch import load_file

    run = load_run(runs["moe"])
    weights = load_file(runs["moe"] / "model.safetensors")
    experts = sum(t.numel() for name, t in weights.items() if ".experts." in name)
    total = sum(t.numel() for t in weights.values())
    share = run.config["num_experts_per_tok"] / run.config["num_experts"]
    assert experts > 0 and share < 1
    assert parameter_counts(run) == (total, pytest.approx(total - (1 - share) * experts))


def test_cli_writes_and_refuses_to_overwrite_without_the_flag(runs, tmp_path, capsys):
    output = tmp_path / "cmp"
    assert cli_main(["compare", str(runs["moe"]), str(runs["dense"]), "--output", str(output)]) == 0
    first = (output / COMPARISON_TABLE).read_text()
    assert "| moe |" in capsys.readouterr().out
    assert cli_main(["compare", str(runs["moe"]), "--output", str(output)]) == EXIT_USER_ERROR
    assert f"--output {output} already holds {COMPARISON_TABLE}; pass --overwrite" in capsys.readouterr().err
    assert (output / COMPARISON_TABLE).read_text() == first
    assert cli_main(["compare", str(runs["moe"]), "--output", str(output), "--overwrite"]) == 0
    assert "dense_control" not in (output / COMPARISON_TABLE).read_text()


def test_cli_missing_folder_and_folder_without_trainer_state(runs, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli_main(["compare", str(runs["moe"]), str(missing)]) == EXIT_USER_ERROR
    assert f"RUN_DIR {missing}: no such folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["compare", str(empty)]) == EXIT_USER_ERROR
    assert f"{empty} holds no trainer_state.json" in capsys.readouterr().err


def test_api_errors_name_the_argument(runs, tmp_path):
    with pytest.raises(ValueError, match="run_dirs must name at least one run folder"):
        compare_runs([])
    (tmp_path / COMPARISON_PLOT).write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="output_dir: .* exists; pass overwrite=True"):
        compare_runs([runs["moe"]], tmp_path)
    assert (tmp_path / COMPARISON_PLOT).read_bytes() == b"keep"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a Trainer state file with a log_history"):
        compare_runs([broken])


def test_interrupted_run_is_read_from_its_newest_checkpoint(runs, tmp_path):
    import shutil

    run = tmp_path / "interrupted"
    for step in (2, 10):
        (run / f"checkpoint-{step}").mkdir(parents=True)
    state = json.loads((runs["moe"] / "trainer_state.json").read_text())
    (run / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"log_history": state["log_history"][:1]}))
    shutil.copy(runs["moe"] / "trainer_state.json", run / "checkpoint-10" / "trainer_state.json")
    assert load_run(run).log_history == state["log_history"]
