"""The upcycling study (python -m studies.upcycling): the quick pipeline end to end (not its conclusions), its
statistics, its record of what produced a report, and that the shipped report (docs/study.md) matches the code."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

import studies.upcycling.__main__ as study
from hf_moe.compare import load_run
from studies.upcycling import data, provenance, report, runs, stats

PNG = b"\x89PNG\r\n\x1a\n"
DOCS = Path(__file__).resolve().parents[2] / "docs"
REGENERATE = "python -m studies.upcycling --output_dir hf_moe_study --publish docs"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    output = tmp_path_factory.mktemp("study") / "quick"
    path = study.main(["--quick", "--output_dir", str(output)])
    return output, path, json.loads((path.parent / report.FOLDER / "results.json").read_text())


def test_quick_study_writes_every_section_with_plots_and_intervals(quick):
    output, path, results = quick
    text = path.read_text()
    for heading in (
        "## 1. Upcycling",
        "## 2. Overfitting",
        "## 3. Router z-loss",
        "## 4. Expert Choice",
        "## 5. Sweeps",
        "## 6. Upcycling modes",
    ):
        assert heading in text
    assert "PARTIAL" not in text and results["complete"]
    for image in text.split("](")[1:]:
        name = image.split(")")[0]
        if name.endswith(".png"):
            assert (path.parent / name).read_bytes()[:8] == PNG, name
    size = data.QUICK
    pairs = size["starts"] * size["seeds"]
    assert len(results["upcycling"]) == pairs
    for key, ci in results["upcycling_differences"].items():
        # At equal CPU time a pair counts only where the dense run's CPU clock reaches the MoE run's: on a loaded
        # machine it may not (CPU time per step varies), and the interval then says over how many pairs it is.
        assert ci["n"] == pairs if key != "dense_equal_cpu_time" else ci["n"] <= pairs, key
        assert ci["n"] < 2 or ci["low"] <= ci["mean"] <= ci["high"], key
    for row in results["upcycling"].values():
        assert row["flops_ratio"] > 1 and row["moe_cpu_seconds_per_step"] > 0 and row["dense_cpu_seconds_per_step"] > 0
    # Copies of the dense MLP with renormalised top-2 gates: the upcycled model at step 0 is the dense one.
    for start in range(size["starts"]):
        moe = load_run(output / "runs" / f"upcycling/start{start}/switch_s0").series("eval_validation_task_loss")
        dense = load_run(output / "runs" / f"upcycling/start{start}/dense_s0").series("eval_validation_task_loss")
        assert moe[0] == (0, pytest.approx(dense[0][1], abs=1e-4))
    # The z-loss section reports the logsumexp and the raw logits; logsumexp >= the largest logit >= the mean one.
    for arm in results["zloss"]["arms"].values():
        for lse, mean in zip(arm["rms_logsumexp"], arm["logit_mean"], strict=True):
            assert lse >= mean
    sweeps = results["sweeps"]["settings"]
    assert sweeps["dropless"]["dropped_fraction"] == [0.0] * size["sweep_seeds"]
    assert (
        sweeps["every_layer"]["flops_ratio"] > sweeps["section 1's MoE"]["flops_ratio"] > sweeps["top1"]["flops_ratio"]
    )
    # Two data-parallel processes (torchrun, gloo): both balancing scopes trained, scored and paired.
    scope = results["sweeps"]["balance_scope"]
    assert scope["seeds"] == list(range(size["sweep_seeds"]))
    assert scope["test loss"]["difference"]["n"] == size["sweep_seeds"]
    aux_losses = []
    for name in runs.BALANCE_SCOPES:
        folder = output / "runs" / f"sweeps/{name}_s0"
        assert "2 process(es), MULTI_CPU" in (folder / runs.TORCHRUN_LOG).read_text()
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        aux_losses.append([entry["aux_loss"] for entry in history if "loss" in entry])
    # The same seed and data: only the balancing loss's scope tells the two apart.
    assert len(aux_losses[0]) > 1 and aux_losses[0] != aux_losses[1]
    assert set(results["overfitting"]["runs"]) == set(runs.OVERFITTING)
    assert results["overfitting"]["chance"] == pytest.approx(1 / size["classes"])
    assert [row["step"] for row in results["expert_choice"]] == [0, 3, 6]
    assert set(results["timing"]) == {
        "pretrain",
        "upcycling",
        "overfitting",
        "zloss_high_lr",
        "expert_choice",
        "sweeps",
        "modes",
    }
    # Every upcycling mode computes the dense function at step 0 (virtual groups, a shared expert whose routed
    # partners start at zero output, renormalised top-2 whatever the selection biases).
    dense = load_run(output / "runs" / "upcycling/start0/dense_s0").series("eval_validation_task_loss")[0]
    for name in runs.MODES:
        mode = load_run(output / "runs" / f"modes/{name}_s0").series("eval_validation_task_loss")[0]
        assert mode == (0, pytest.approx(dense[1], abs=1e-4)), name
    assert len(results["modes"]) == 1 + len(runs.MODES)
    for row in list(results["modes"].values())[1:]:
        assert row["minus_plain"]["n"] == size["sweep_seeds"] and 0 < min(row["balance"]) <= max(row["balance"]) <= 1


def test_the_report_records_the_code_and_the_configuration_that_produced_it(quick):
    _, _, results = quick
    record = results["provenance"]
    files = record["code_files"]
    for name in ("studies/upcycling/runs.py", "recipes/finetune_clm.py", "hf_moe/modeling/modeling_moe.py"):
        assert name in files
    assert record["code_sha256"] == provenance.code_identity(files)
    assert record["code_sha256"] != provenance.code_identity(files[1:])  # a file fewer: another identity
    assert record["configuration"] == json.loads(json.dumps(runs.configuration(data.sizes(quick=True, scale=False))))
    assert record["configuration_sha256"] == provenance.configuration_identity(record["configuration"])
    assert record["runs_match_code"] and record["files_changed_since_the_runs"] == []


def test_a_report_rewritten_by_other_code_than_made_the_runs_says_so(quick, tmp_path):
    output, path, _ = quick
    copy = tmp_path / "quick"
    shutil.copytree(output, copy)
    recorded = copy / "runs" / "upcycling" / "start0" / "switch_s0" / runs.RUN_CODE
    digests = json.loads(recorded.read_text())
    digests["studies/upcycling/sections.py"] = "0" * 64  # as if sections.py changed after this run
    recorded.write_text(json.dumps(digests))
    rewritten = study.main(["--quick", "--output_dir", str(copy), "--report_only"])
    record = json.loads((rewritten.parent / report.FOLDER / "results.json").read_text())["provenance"]
    assert not record["runs_match_code"]
    assert record["files_changed_since_the_runs"] == ["studies/upcycling/sections.py"]
    assert "WARNING: the runs were made by other code" in rewritten.read_text()


OUT_OF_DATE = "> **Out of date.**"  # the banner a report carries once the code has moved on without it


def shipped_report_problems() -> list[str]:
    """Why docs/study.md does not describe what the shipped study would produce (empty when it does)."""
    results = json.loads((DOCS / "study" / "results.json").read_text())
    if "provenance" not in results:
        return ["docs/study/results.json records no provenance: the report predates the code"]
    record = results["provenance"]
    problems = []
    if not record["runs_match_code"]:
        problems.append(f"it was written from runs of other code ({record['files_changed_since_the_runs']})")
    if record["configuration"] != json.loads(json.dumps(runs.configuration(data.sizes(**record["mode"])))):
        problems.append("it was made with another configuration than the study runs now")
    if record["code_sha256"] != provenance.code_identity(record["code_files"]):
        problems.append(f"it was made by other code than ships (commit {record['git_commit']})")
    return problems


def test_shipped_report_matches_the_code_unless_it_says_it_is_out_of_date():
    """A stale docs/study.md (older code or another configuration than the study would run now) fails here, unless
    its first lines say so to the reader; a current one must not carry that banner."""
    problems = shipped_report_problems()
    marked = OUT_OF_DATE in (DOCS / "study.md").read_text().split("\n\n", 2)[1]
    assert marked or not problems, f"docs/study.md is stale: {'; '.join(problems)}. Regenerate it with {REGENERATE}"
    assert problems or not marked, "docs/study.md matches the code but is marked out of date: remove the banner"


def test_finished_study_is_kept_unless_overwrite_and_report_only_rewrites_the_report(quick):
    output, path, _ = quick
    with pytest.raises(SystemExit, match="holds a finished study; pass --overwrite"):
        study.main(["--quick", "--output_dir", str(output)])
    path.write_text("stale")
    assert study.main(["--quick", "--output_dir", str(output), "--report_only"]) == path
    assert path.read_text().startswith("# hf_moe upcycling study (quick mode")


def test_publish_replaces_the_previous_report_only_when_complete(quick, tmp_path):
    _, path, results = quick
    docs = tmp_path / "docs"
    (docs / "study").mkdir(parents=True)
    (docs / "study" / "old.png").write_bytes(b"old")
    (docs / "study.md").write_text("old")
    report.publish(path, docs)
    assert (docs / "study.md").read_text() == path.read_text()
    assert json.loads((docs / "study" / "results.json").read_text())["provenance"] == results["provenance"]
    assert not (docs / "study" / "old.png").exists() and not list(docs.glob(".study*"))


def test_runs_of_other_sizes_are_not_mixed(tmp_path, monkeypatch):
    (tmp_path / "study_sizes.json").write_text(json.dumps({**data.QUICK, "seeds": 5}))
    with pytest.raises(SystemExit, match="holds runs of a study with other sizes"):
        study.main(["--quick", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--report_only: .* holds no finished study runs"):
        study.main(["--quick", "--output_dir", str(tmp_path / "empty"), "--report_only"])
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as error:
        study.main(["--scale", "--output_dir", str(tmp_path / "scale")])
    assert error.value.code == 2 and not (tmp_path / "scale").exists()


def test_every_recipe_option_comes_from_one_function():
    argv = runs.recipe_argv("start", replace(runs.SWITCH, dense=True, top_k=None), {"train_file": "t"}, {"seed": 3})
    options = dict(zip(argv[::2], argv[1::2], strict=True))
    assert options["--dense_control"] == "true" and json.loads(options["--upcycle"])["routing"] == "switch"
    assert "--num_experts_per_tok" not in options and "--train_parameters" not in options
    assert options["--train_file"] == "t" and options["--seed"] == "3" and options["--model_name_or_path"] == "start"
    # The plan is a function of the sizes; every run has a unique folder and a command line.
    plan = runs.plan(data.FULL)
    assert len({spec.folder for spec in plan}) == len(plan)
    assert sum(spec.pretrain for spec in plan) == data.FULL["starts"]


def test_scale_sizes_reach_100m_parameters():
    s = data.SCALE
    per_layer = 4 * s["hidden_size"] ** 2 + 3 * s["hidden_size"] * s["intermediate_size"]
    assert s["layers"] * per_layer + s["vocab_size"] * s["hidden_size"] >= 100e6
    assert s["bf16"] and not s["use_cpu"] and s["recursive"]


def test_paired_interval_is_students_t():
    ci = stats.paired([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])  # differences 1, 2, 3
    half = 4.303 * 1.0 / math.sqrt(3)
    assert ci["mean"] == pytest.approx(2.0) and ci["low"] == pytest.approx(2 - half, abs=1e-3)
    assert not ci["excludes_zero"] and stats.interval([1.9, 2.0, 2.1])["excludes_zero"]
    assert stats.interval([1.0])["low"] is None and stats.t_975(40) == pytest.approx(2.021, abs=0.003)
    rows = stats.band([[(0, 1.0), (1, 2.0)], [(0, 3.0), (1, 2.0), (2, 9.0)]])
    assert [r[:2] for r in rows] == [(0, 2.0), (1, 2.0)]


@pytest.mark.slow
def test_quick_scale_study_runs_the_scale_code_path_at_toy_size(tmp_path):
    path = study.main(["--quick", "--scale", "--output_dir", str(tmp_path)])
    results = json.loads((path.parent / report.FOLDER / "results.json").read_text())
    assert results["complete"] and results["provenance"]["mode"] == {"quick": True, "scale": True}
