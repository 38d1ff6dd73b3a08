"""Fault cases of the recipes and the training pieces (issue "Nothing lost, nothing leaked"): each test
fails on the code before the fix. Overwrite safety, non-finite options, checkpoints that lost a file,
labels out of range, mismatched data files, `hf-moe compare` inputs, clean recipe errors, the
launcher's mixed precision, TRL's stock trainer and metrics, adapters and EC thresholds, deprecations."""

import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from datasets import ClassLabel, Dataset, Features, Value
from recipe_helpers import RECIPES, REPO, classification_settings, clm_settings, run_recipe, write_settings

import hf_moe
from hf_moe import compare_runs
from hf_moe.training import DataArguments, MoeArguments, MoeSFTConfig, prepare_run
from hf_moe.training.data import load_train_and_validation
from hf_moe.training.outputs import REPLACED_SUFFIX, STAGING_SUFFIX, check_output_dir

QUICK = {"max_steps": 2, "eval_steps": 2, "train_eval_samples": 4}


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished CLM run with a checkpoint, run as `accelerate launch` with a bf16 config would set the
    environment, with --bf16 false."""
    root = tmp_path_factory.mktemp("faults")
    saved = os.environ.get("ACCELERATE_MIXED_PRECISION")
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    try:
        result = run_recipe(
            "finetune_clm", clm_settings(assets, root / "run", save_strategy="steps", save_steps=2, **QUICK), root
        )
    finally:
        if saved is None:
            os.environ.pop("ACCELERATE_MIXED_PRECISION")
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = saved
    return root, result


# 1. Overwriting keeps the previous run until the new one is complete.


def test_a_failed_overwrite_keeps_the_previous_run(assets, finished, tmp_path):
    root, _ = finished
    shutil.copytree(root / "run", tmp_path / "run")
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    (tmp_path / "empty.txt").write_text("\n")
    settings = clm_settings(
        assets, tmp_path / "run", overwrite_output_dir=True, validation_file=str(tmp_path / "empty.txt"), **QUICK
    )
    with pytest.raises(ValueError, match="the validation data is empty"):
        run_recipe("finetune_clm", settings, tmp_path)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    assert (tmp_path / "run" / "finetune_config.yaml").is_file() and (tmp_path / "run" / "checkpoint-2").is_dir()


def test_model_inside_output_dir_is_read_before_the_run_is_replaced(assets, finished, tmp_path):
    root, _ = finished
    shutil.copytree(root / "run", tmp_path / "run")
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    settings = clm_settings(
        assets, tmp_path / "run", model_name_or_path=str(tmp_path / "run"), overwrite_output_dir=True, **QUICK
    )
    result = run_recipe("finetune_clm", settings, tmp_path)
    assert result["output_dir"] == str(tmp_path / "run")
    after = (tmp_path / "run" / "model.safetensors").read_bytes()
    assert after != before and (tmp_path / "run" / "finetune_config.yaml").is_file()
    with open(tmp_path / "run" / "finetune_config.yaml") as f:
        assert yaml.safe_load(f)["output_dir"] == str(tmp_path / "run")
    assert sorted(os.listdir(tmp_path)) == sorted(n for n in os.listdir(tmp_path) if not n.startswith("run.")), (
        "no staging or replaced folder is left"
    )
    # The new run started from the previous one (its weights, not the session's switch checkpoint).
    assert result["history"][0]["validation"]["loss"] == pytest.approx(
        finished[1]["history"][-1]["validation"]["loss"], rel=1e-4
    )


def test_a_publish_killed_between_its_renames_is_finished_or_undone(tmp_path):
    out = tmp_path / "run"
    for complete in (True, False):
        (tmp_path / f"run{REPLACED_SUFFIX}").mkdir()
        (tmp_path / f"run{REPLACED_SUFFIX}" / "finetune_config.yaml").write_text("old: 1\n")
        (tmp_path / f"run{STAGING_SUFFIX}").mkdir()
        if complete:
            (tmp_path / f"run{STAGING_SUFFIX}" / "finetune_config.yaml").write_text("new: 1\n")
        out.mkdir()  # re-created empty by a script before the next run
        with pytest.raises(ValueError, match="holds a finished run"):
            check_output_dir(str(out), overwrite=False, resume=None)
        assert (out / "finetune_config.yaml").read_text() == ("new: 1\n" if complete else "old: 1\n")
        assert not (tmp_path / f"run{REPLACED_SUFFIX}").exists()
        shutil.rmtree(out)
        shutil.rmtree(tmp_path / f"run{STAGING_SUFFIX}", ignore_errors=True)


# 4. Non-finite numbers are refused by name.


@pytest.mark.parametrize(
    "name, value",
    [
        ("router_z_loss_coef", math.nan),
        ("router_aux_loss_coef", math.inf),
        ("expert_dropout", math.nan),
        ("router_jitter_noise", math.nan),
        ("early_stopping_threshold", math.nan),
    ],
)
def test_non_finite_moe_options_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number, got {value!r}"):
        MoeArguments(model_name_or_path="m", **{name: value})


@pytest.mark.parametrize(
    "name, value, allowed", [("noise_std", math.nan, ">= 0"), ("drop_ratio", math.inf, r"in \[0, 1\]")]
)
def test_non_finite_upcycling_options_are_refused_by_their_key(name, value, allowed):
    with pytest.raises(ValueError, match=f"upcycle.{name} must be a finite number {allowed}, got {value!r}"):
        MoeArguments(model_name_or_path="m", upcycle={"expert_init": name.split("_")[0], name: value})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_capacity_factor_is_refused(value):
    with pytest.raises(ValueError, match=f"capacity_factor must be a finite number > 0 or 'dropless'.*got '{value}'"):
        MoeArguments(model_name_or_path="m", capacity_factor=value)


def test_non_finite_trainer_options_are_refused(tmp_path):
    training = MoeSFTConfig(output_dir=str(tmp_path / "out"), learning_rate=math.nan, max_grad_norm=math.inf)
    with pytest.raises(ValueError, match="learning_rate must be a finite number, got nan") as error:
        prepare_run(MoeArguments(model_name_or_path="m"), None, training)
    assert "max_grad_norm must be a finite number, got inf" in str(error.value)


# 6. Checkpoints, labels, data files, compare.


def test_a_checkpoint_that_lost_its_optimizer_state_is_refused(assets, finished, tmp_path):
    root, _ = finished
    shutil.copytree(root / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-2")
    (tmp_path / "run" / "checkpoint-2" / "optimizer.pt").unlink()
    settings = clm_settings(assets, tmp_path / "run", resume_from_checkpoint="true", max_steps=4, eval_steps=2)
    with pytest.raises(ValueError, match=r"checkpoint-2' is missing optimizer.pt, written with it"):
        run_recipe("finetune_clm", settings, tmp_path)


def test_classification_label_out_of_range_names_label_file_and_num_labels(assets, tmp_path):
    features = Features(sentence=Value("string"), label=ClassLabel(names=["negative", "positive"]))
    Dataset.from_dict({"sentence": ["good", "bad"] * 8, "label": [1, 0] * 8}, features=features).to_parquet(
        tmp_path / "train.parquet"
    )
    Dataset.from_dict({"sentence": ["fine", "poor"], "label": [1, -1]}, features=features).to_parquet(
        tmp_path / "validation.parquet"
    )
    settings = classification_settings(
        assets,
        tmp_path / "out",
        train_file=str(tmp_path / "train.parquet"),
        validation_file=str(tmp_path / "validation.parquet"),
        max_steps=1,
    )
    with pytest.raises(
        ValueError,
        match=r"label values \[-1\] in the validation data \(validation_file '.*validation.parquet'\) are not "
        r"labels of the training data: num_labels is 2",
    ):
        run_recipe("finetune_classification", settings, tmp_path)


def test_train_and_validation_files_with_different_columns_name_both(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,label\ngood,1\nbad,0\n")
    (tmp_path / "validation.csv").write_text("text,label\nfine,1\n")
    config = DataArguments(train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "validation.csv"))
    with pytest.raises(ValueError) as error:
        load_train_and_validation(config)
    message = str(error.value)
    assert message.startswith("train_file and validation_file must have the same columns: ")
    assert "train.csv' has columns ['sentence', 'label']" in message and "['text', 'label']" in message
    assert "\n" not in message


def fake_run(folder, state_text: str | bytes, architectures=None):
    folder.mkdir(parents=True)
    path = folder / "trainer_state.json"
    path.write_bytes(state_text) if isinstance(state_text, bytes) else path.write_text(state_text)
    if architectures:
        (folder / "config.json").write_text(json.dumps({"architectures": architectures}))
    return folder


@pytest.mark.parametrize(
    "content, problem",
    [("[1, 2]", "it holds a JSON list, not an object"), (b"\x80\x81\xff\x00", "UnicodeDecodeError")],
)
def test_compare_names_a_trainer_state_that_is_not_one(tmp_path, capsys, content, problem):
    from hf_moe.cli import EXIT_USER_ERROR
    from hf_moe.cli import main as cli_main

    run = fake_run(tmp_path / "run", content)
    with pytest.raises(ValueError, match=f"{run / 'trainer_state.json'} is not a Trainer state file.*{problem}"):
        compare_runs([run])
    assert cli_main(["compare", str(run)]) == EXIT_USER_ERROR
    assert str(run / "trainer_state.json") in capsys.readouterr().err


def test_compare_refuses_a_causal_lm_run_next_to_a_classification_run(tmp_path):
    history = json.dumps({"log_history": [{"step": 1, "loss": 1.0}]})
    clm = fake_run(tmp_path / "clm", history, ["SwitchMoeForCausalLM"])
    classifier = fake_run(tmp_path / "classifier", history, ["SwitchMoeForSequenceClassification"])
    with pytest.raises(
        ValueError, match=r"run_dirs must be runs of one task, got clm \(causal LM\), classifier \(sequence classif"
    ):
        compare_runs([clm, classifier])


# 7. Recipe errors: one clean line; the traceback behind --debug or HF_MOE_DEBUG=1.


@pytest.mark.parametrize("debug", ["none", "flag", "environment"])
def test_recipe_user_error_is_one_line_unless_debugging(tmp_path, debug):
    config = write_settings(tmp_path / "c.yaml", {"model_name_or_path": "m", "train_file": str(tmp_path / "no.txt")})
    command = [sys.executable, str(RECIPES / "finetune_clm.py"), "--config", config]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("HF_MOE_DEBUG", None)
    if debug == "flag":
        command.append("--debug")
    elif debug == "environment":
        environment["HF_MOE_DEBUG"] = "1"
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    if debug == "none":
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert (
            result.stderr.strip().splitlines()[-1]
            == f"finetune_clm.py: error: train_file: no such file '{tmp_path}/no.txt'"
        )
    else:
        assert "Traceback" in result.stderr and "FileNotFoundError: train_file: no such file" in result.stderr


# 9. --bf16 false wins over ACCELERATE_MIXED_PRECISION, and the precision used is recorded.


def test_bf16_false_wins_over_the_launcher_and_is_recorded(finished):
    root, _ = finished
    with open(root / "run" / "finetune_config.yaml") as f:
        assert yaml.safe_load(f)["mixed_precision"] == "no"


def test_classification_precision_flags_win_over_the_launcher(monkeypatch, tmp_path):
    from trl import TrlParser

    from hf_moe.training import ClassificationDataArguments, MoeTrainingArguments

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    parser = TrlParser((MoeArguments, ClassificationDataArguments, MoeTrainingArguments))
    (tmp_path / "t.csv").write_text("sentence,label\na,1\n")
    common = ["--model_name_or_path", "m", "--train_file", str(tmp_path / "t.csv"), "--output_dir", str(tmp_path)]
    *_, flagged = parser.parse_args_and_config([*common, "--use_cpu", "true", "--bf16", "false"])
    *_, unflagged = parser.parse_args_and_config([*common, "--use_cpu", "true"])
    assert (flagged.mixed_precision, unflagged.mixed_precision) == ("no", "bf16")


# 10/11. TRL's stock SFTTrainer warns once; MoeSFTTrainer keeps TRL's token metrics.


def tiny_sft(trainer_class, tmp_path, kind="switch"):
    from recipe_helpers import build_tokenizer, clm_lines, tiny_dense_config
    from trl import SFTConfig

    tokenizer = build_tokenizer(clm_lines(100, seed=0))
    torch.manual_seed(0)
    dense = tiny_dense_config(len(tokenizer))
    config = hf_moe.SwitchMoeConfig(text_config=dense, num_experts=4, moe_layers=[0, 1], router_z_loss_coef=0.01)
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=4,
        max_length=16,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    data = Dataset.from_dict({"text": clm_lines(16, seed=1)})
    model = hf_moe.SwitchMoeForCausalLM(config)
    return trainer_class(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def test_trl_sft_command_warns_once_that_router_terms_are_left_out(assets, tmp_path):
    # TRL's own entry point (`trl sft`, which launches trl/scripts/sft.py with accelerate): the checkpoint's
    # code is loaded as remote code, as a `trl sft` user would load it.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"text": line}) + "\n" for line in (assets["root"] / "train.txt").read_text().splitlines())
    )
    command = [sys.executable, "-m", "trl.cli.main", "sft", "--model_name_or_path", assets["switch"]]
    command += ["--trust_remote_code", "true", "--dataset_name", str(tmp_path / "data"), "--max_steps", "3"]
    command += ["--per_device_train_batch_size", "4", "--max_length", "16", "--output_dir", str(tmp_path / "out")]
    command += ["--report_to", "none", "--use_cpu", "true", "--bf16", "false", "--save_strategy", "no"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "always::UserWarning"}
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("the loss leaves out the model's router terms") == 1
    assert "Train with hf_moe.training.MoeSFTTrainer" in result.stderr


def test_moe_sft_trainer_logs_trls_token_metrics_like_sft_trainer(tmp_path):
    from trl import SFTTrainer

    from hf_moe.training import MoeSFTTrainer

    ours, stock = tiny_sft(MoeSFTTrainer, tmp_path), tiny_sft(SFTTrainer, tmp_path)
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    for trainer in (ours, stock):
        trainer.model.train()
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.compute_loss(trainer.model, dict(batch))
        assert not [w for w in caught if "router terms" in str(w.message)] or trainer is stock
    for name in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert ours._metrics["train"][name] == pytest.approx(stock._metrics["train"][name], rel=1e-4), name
    assert ours._metrics["train"]["num_tokens"][0] > 0
    ours.train()
    logged = [row for row in ours.state.log_history if "loss" in row]
    assert all({"entropy", "mean_token_accuracy", "num_tokens"} <= set(row) for row in logged)


# 12. An adapter made with get_peft_model on an Expert-Choice model: thresholds saved, or a loud warning.


def test_adapter_without_routers_warns_that_thresholds_are_not_saved(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig

    dense = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    config = hf_moe.ExpertChoiceMoeConfig(text_config=dense, num_experts=4, moe_layers=[1])

    def trained(modules_to_save):
        torch.manual_seed(0)
        model = get_peft_model(
            hf_moe.ExpertChoiceMoeForCausalLM(config),
            LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=modules_to_save),
        )
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            ids = torch.randint(0, 64, (2, 8))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return model

    model = trained(None)
    with pytest.warns(
        UserWarning, match=r'score thresholds .* are not saved with the adapter.*modules_to_save=\["router"\]'
    ):
        model.save_pretrained(tmp_path / "plain")

    model = trained(["router"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.save_pretrained(tmp_path / "with_router")
    torch.manual_seed(1)
    reloaded = PeftModel.from_pretrained(hf_moe.ExpertChoiceMoeForCausalLM(config), tmp_path / "with_router")
    # The adapter's copy of each router (PEFT keeps the base's original next to it).
    trained_thresholds = [b for n, b in model.named_buffers() if n.endswith("modules_to_save.default.score_thresholds")]
    loaded_thresholds = [
        b for n, b in reloaded.named_buffers() if n.endswith("modules_to_save.default.score_thresholds")
    ]
    assert len(trained_thresholds) == 1 and trained_thresholds[0].abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(trained_thresholds, loaded_thresholds, strict=True))


# 13. The demo's recipe config raises none of our own deprecation warnings.


def test_demo_recipe_config_parses_without_deprecation_warnings(tmp_path):
    from trl import TrlParser

    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n')
    parser = TrlParser((MoeArguments, DataArguments, MoeSFTConfig))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        *_, training = parser.parse_args_and_config(
            [
                "--config",
                str(RECIPES / "configs" / "demo_switch.yaml"),
                "--train_file",
                str(tmp_path / "t.jsonl"),
                "--validation_file",
                str(tmp_path / "t.jsonl"),
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
    assert training.activation_checkpointing is True  # TRL's default kept, under the current name
