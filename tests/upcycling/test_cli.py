"""The hf-moe command line and python -m hf_moe.upcycle."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_moe.cli import main
from hf_moe.upcycle import build_parser


def run_cli(argv, capsys):
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_upcycle_with_verification(save_dense, tmp_path, capsys):
    _, source = save_dense("llama")
    output = tmp_path / "moe"
    status, out, err = run_cli(
        [
            "upcycle",
            str(source),
            str(output),
            "--num-experts",
            "4",
            "--num-experts-per-tok",
            "2",
            "--moe-layers",
            "0,2",
            "--capacity-factor",
            "dropless",
            "--router-z-loss-coef",
            "0",
            "--verify",
            "--no-progress",
        ],
        capsys,
    )
    assert status == 0, err
    assert (
        "layer   0: max relative deviation" in out
        and "layer   2:" in out
        and "PASSED" in out
        and f"Wrote {output}" in out
    )
    config = json.loads((output / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_layers"]) == (4, 2, [0, 2])
    assert config["capacity_factor"] is None and config["router_z_loss_coef"] == 0 and config["norm_topk_prob"] is True


def test_python_dash_m_parser_converts(save_dense, tmp_path, capsys):
    _, source = save_dense("gpt2")
    argv = [
        str(source),
        str(tmp_path / "moe"),
        "--routing",
        "expert_choice",
        "--num-experts",
        "2",
        "--capacity-factor",
        "1.5",
        "--expert-init",
        "drop",
        "--drop-ratio",
        "0.25",
        "--no-progress",
    ]
    assert main(argv, parser=build_parser()) == 0
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "expert_choice_moe" and config["capacity_factor"] == 1.5
    assert config["upcycling"]["drop_ratio"] == 0.25


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--routing", "expert_choice", "--num-experts-per-tok", "2"],
            "--num-experts-per-tok is not a setting of --routing expert_choice (ExpertChoiceMoeConfig); its settings: "
            "--router-z-loss-coef, --expert-dropout",
        ),
        (["--drop-ratio", "0.3"], "--drop-ratio applies to --expert-init drop only, got --expert-init copy"),
        (
            ["--noise-std", "0.3", "--expert-init", "drop"],
            "--noise-std applies to --expert-init noise only, got --expert-init drop",
        ),
        (
            ["--num-experts", "2", "--num-experts-per-tok", "3"],
            "--num-experts-per-tok must be between 1 and num_experts (2), got 3",
        ),
        (
            ["--capacity-factor", "none"],
            "--capacity-factor must be a finite number > 0 or 'dropless' (no limit), got 'none'",
        ),
        (
            ["--moe-layers", "0,x"],
            "--moe-layers must be one of ['every_other', 'all', 'last_half'] or layer indices such as 0,2,5, got '0,x'",
        ),
        (["--balance-scope", "world"], "--balance-scope must be one of ['micro_batch', 'global_batch'], got 'world'"),
        (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
        (["--max-shard-size", "lots"], "--max-shard-size must be a positive size such as '5GB'"),
    ],
)
def test_user_errors_exit_with_a_message(extra, message, save_dense, tmp_path, capsys):
    _, source = save_dense("llama")
    status, _, err = run_cli(["upcycle", str(source), str(tmp_path / "moe"), "--no-progress", *extra], capsys)
    assert status == 2 and "hf-moe: error:" in err and message in err
    assert not (tmp_path / "moe").exists()


def test_help_of_both_commands(capsys):
    # The console script pip installed beside this interpreter (not whatever `hf-moe` PATH finds).
    script = Path(sys.executable).with_name("hf-moe")
    if not script.is_file():
        pytest.skip(f"no hf-moe console script beside {sys.executable}: install the package (pip install -e .)")
    top = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "upcycle" in top and "convert a dense checkpoint" in top
    with pytest.raises(SystemExit):
        main(["upcycle", "--help"])
    dash_m = subprocess.run(
        [sys.executable, "-m", "hf_moe.upcycle", "--help"], capture_output=True, text=True, check=True
    )
    upcycle = capsys.readouterr().out
    assert "Convert a dense transformers checkpoint" in upcycle
    assert upcycle.split("positional arguments:")[1] == dash_m.stdout.split("positional arguments:")[1]


def test_top_1_renormalised_warns_in_flag_terms_and_top_2_is_the_default(save_dense, tmp_path, capsys):
    _, source = save_dense("llama")
    argv = ["upcycle", str(source), str(tmp_path / "top1"), "--no-progress", "--num-experts-per-tok", "1"]
    status, _, err = run_cli(argv, capsys)
    assert status == 0
    assert "hf-moe: warning: --num-experts-per-tok 1 with --norm-topk-prob: the single renormalised gate is" in err
    assert "Use --num-experts-per-tok 2 (the default)" in err
    assert "or --norm-topk-prob false for Switch's raw gate" in err
    status, _, err = run_cli(["upcycle", str(source), str(tmp_path / "default"), "--no-progress"], capsys)
    config = json.loads((tmp_path / "default" / "config.json").read_text())
    assert status == 0 and "warning" not in err
    assert (config["num_experts_per_tok"], config["norm_topk_prob"]) == (2, True)


def test_path_errors_name_the_positional_arguments(save_dense, tmp_path, capsys):
    _, source = save_dense("llama")
    (tmp_path / "link").symlink_to(source)
    status, _, err = run_cli(["upcycle", str(source), str(tmp_path / "link"), "--overwrite"], capsys)
    assert status == 2 and f"hf-moe: error: OUTPUT_DIR '{tmp_path / 'link'}' is a symbolic link" in err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("kept")
    status, _, err = run_cli(["upcycle", str(source), str(tmp_path / "out")], capsys)
    assert status == 2 and f"OUTPUT_DIR '{tmp_path / 'out'}' is not empty; pass --overwrite to replace it" in err


def test_help_documents_the_defaults_that_train(capsys):
    with pytest.raises(SystemExit):
        main(["upcycle", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "k of top-k. Upcycling sets it to 2 unless given: with renormalised gates the model computes" in text
    assert "(unset: switch 2 when upcycling, else 1, aux_free 2 when upcycling, else 2)" in text
    assert "never code" in text


def test_export_and_import_name_their_arguments(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("kept")
    for command in ("export", "import"):
        status, _, err = run_cli([command, str(tmp_path / "moe"), str(tmp_path / "out"), "--no-verify"], capsys)
        assert status == 2 and f"OUTPUT_DIR '{tmp_path / 'out'}' is not empty; pass --overwrite to replace it" in err
        status, _, err = run_cli([command, "a", str(tmp_path / "new"), "--max-shard-size", "lots"], capsys)
        assert status == 2 and "--max-shard-size must be a positive size such as '5GB'" in err
    assert (tmp_path / "out" / "x").read_text() == "kept" and not (tmp_path / "new").exists()
