"""The upcycling study's quick mode end to end (python -m studies.upcycling --quick): the pipeline, not its
conclusions."""

import json

import pytest

import studies.upcycling.__main__ as study_main
from studies.upcycling import data

PNG = b"\x89PNG\r\n\x1a\n"


def load_study():
    return study_main


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    module = load_study()
    output = tmp_path_factory.mktemp("study") / "quick"
    report = module.main(["--quick", "--output_dir", str(output)])
    return module, output, report


def test_quick_study_writes_every_section_with_plots_and_tables(study):
    module, output, report = study
    text = report.read_text()
    for heading in ("## 1. Upcycling", "## 2. Overfitting", "## 3. Router z-loss", "## 4. Expert Choice"):
        assert heading in text
    assert "PARTIAL" not in text
    for image in text.split("](")[1:]:
        name = image.split(")")[0]
        assert (report.parent / name).read_bytes()[:8] == PNG, name
    results = json.loads((report.parent / "results.json").read_text())
    assert results["complete"] and set(results["upcycling"]) == {"0", "1"}
    for seed in results["upcycling"].values():
        # Copies of the dense MLP with renormalised top-2 gates: the upcycled model at step 0 is the dense one.
        assert seed["moe_step0"] == pytest.approx(seed["dense_start"], abs=1e-4)
        assert seed["flops_ratio"] > 1 and seed["dense_equal_time"] is not None
    assert set(results["overfitting"]) == {
        "dense",
        "switch",
        "switch_expert_dropout0.1",
        "switch_expert_dropout0.4",
        "switch_non_moe",
    }
    assert [row["step"] for row in results["expert_choice"]] == [0, 3, 6]
    compared = (report.parent / "compare_overfitting" / "comparison.md").read_text()
    assert all(f"| {name}_s0 |" in compared for name in results["overfitting"])


def test_finished_study_is_kept_unless_overwrite_and_report_only_rewrites_the_report(study):
    module, output, report = study
    with pytest.raises(SystemExit, match="holds a finished study; pass --overwrite"):
        module.main(["--quick", "--output_dir", str(output)])
    report.write_text("stale")
    assert module.main(["--quick", "--output_dir", str(output), "--report_only"]) == report
    assert report.read_text().startswith("# hf_moe study (quick mode")


def test_runs_of_other_sizes_are_not_mixed(tmp_path):
    module = load_study()
    (tmp_path / "study_sizes.json").write_text(json.dumps({**data.QUICK, "seeds": 5}))
    with pytest.raises(SystemExit, match="holds runs of a study with other sizes"):
        module.main(["--quick", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--report_only: .* holds no finished study runs"):
        module.main(["--quick", "--output_dir", str(tmp_path / "empty"), "--report_only"])
