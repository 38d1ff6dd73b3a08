"""Fault cases of the converter and its command line: nothing lost, nothing leaked, bad input refused.

Each test reproduces one case found by trying the CLI as a careful user and as an attacker would:
an interrupted ``--overwrite`` followed by ``mkdir -p OUTPUT_DIR``, tokenizer files linked out of
the source, non-finite numbers given to options, non-finite or integer weights, a config edited
to disagree with its weights, outputs in impossible places, and fault-test children that ignore
SIGINT. The killed-conversion machinery is shared with test_faults.py.
"""

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import test_faults
import torch
from safetensors.torch import load_file, save_file
from test_faults import FORK, OPTIONS, run_and_signal, upcycle_argv
from test_native import save_native
from tiny_models import leftovers, tiny_config, tiny_dense
from transformers import AutoModelForCausalLM

import hf_moe.checkpoints.sources as sources
import hf_moe.checkpoints.staging as staging
from hf_moe import (
    ExpertChoiceMoeConfig,
    SwitchMoeConfig,
    export_checkpoint,
    import_checkpoint,
    upcycle_checkpoint,
    upcycle_model,
)
from hf_moe.cli import main


@pytest.fixture
def source(save_dense):
    return save_dense("llama", name="dense")[1]


def rewrite_tensor(folder: Path, name: str, edit) -> None:
    """Apply ``edit`` to one tensor of ``folder/model.safetensors`` in place."""
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = edit(tensors[name])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# --- 2. an interrupted --overwrite, then an empty OUTPUT_DIR -------------------------------------------


def test_interrupted_overwrite_then_an_empty_output_dir_keeps_the_previous_output(source, tmp_path, caplog):
    output = upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)
    previous = (output / "model.safetensors").read_bytes()
    status = run_and_signal("publishing", signal.SIGKILL, upcycle_argv(source, output, "--overwrite", "--seed", "1"))
    assert status == -signal.SIGKILL and not output.exists()
    output.mkdir()  # `mkdir -p OUTPUT_DIR` in a script, before the next run

    with pytest.raises(FileExistsError, match="is not empty; pass overwrite=True"):
        upcycle_checkpoint(source, output, seed=1, **OPTIONS)
    assert (output / "model.safetensors").read_bytes() == previous
    assert leftovers(tmp_path) == ["dense", "out"] and "Restored" in caplog.text


def test_killed_after_publishing_keeps_the_new_output(source, tmp_path, caplog):
    output = upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)
    status = run_and_signal("published", signal.SIGKILL, upcycle_argv(source, output, "--overwrite", "--seed", "1"))
    assert status == -signal.SIGKILL
    new = (output / "model.safetensors").read_bytes()
    assert new != (upcycle_checkpoint(source, tmp_path / "seed0", **OPTIONS) / "model.safetensors").read_bytes()

    with pytest.raises(FileExistsError, match="is not empty; pass overwrite=True"):  # the next run cleans up
        upcycle_checkpoint(source, output, **OPTIONS)
    assert (output / "model.safetensors").read_bytes() == new
    assert leftovers(tmp_path) == ["dense", "out", "seed0"] and "Removed" in caplog.text


def test_killed_swap_with_other_files_in_output_dir_loses_neither(source, tmp_path):
    output = upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)
    previous = (output / "model.safetensors").read_bytes()
    status = run_and_signal("publishing", signal.SIGKILL, upcycle_argv(source, output, "--overwrite", "--seed", "1"))
    assert status == -signal.SIGKILL
    output.mkdir()
    (output / "notes.txt").write_text("mine")  # someone else's files, not the new output

    with pytest.raises(FileExistsError, match=r"the previous output"):
        upcycle_checkpoint(source, output, overwrite=True, **OPTIONS)
    (replaced,) = [p for p in tmp_path.iterdir() if "-replaced." in p.name]
    assert (replaced / "out" / "model.safetensors").read_bytes() == previous
    assert (output / "notes.txt").read_text() == "mine"


def test_failed_swap_into_an_empty_output_dir_restores_the_previous_output(source, tmp_path, monkeypatch):
    output = upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)
    previous = (output / "model.safetensors").read_bytes()
    rename = os.rename

    def failing_rename(src, dst):
        if ".hf-moe-upcycle-unfinished." in str(src):  # the new output moving into place
            Path(dst).mkdir()  # another process re-creates the folder, then the rename fails
            raise OSError(5, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(staging, "os", test_faults._Namespace(os, rename=failing_rename))
    with pytest.raises(OSError, match="Input/output error"):
        upcycle_checkpoint(source, output, overwrite=True, seed=1, **OPTIONS)
    assert (output / "model.safetensors").read_bytes() == previous
    assert leftovers(tmp_path) == ["dense", "out"]


# --- 3. source files linked out of the source --------------------------------------------------------------


def test_source_files_linking_out_of_the_source_are_not_copied(source, tmp_path, caplog):
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2")
    (source / "vocab.txt").symlink_to(secret)
    (source / "chat_template.jinja").symlink_to(secret)
    (source / "additional_chat_templates").mkdir()
    (source / "additional_chat_templates" / "tool.jinja").symlink_to(secret)
    (source / "tokenizer.json").symlink_to(source / "generation_config.json")  # inside the source: fine

    output = upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)
    written = [p for p in output.rglob("*") if p.is_file()]
    assert not any("hunter2" in p.read_bytes().decode(errors="replace") for p in written)
    assert (output / "tokenizer.json").read_bytes() == (source / "generation_config.json").read_bytes()
    assert not (output / "vocab.txt").exists() and not (output / "chat_template.jinja").exists()
    assert "links out of the source" in caplog.text and "vocab.txt" in caplog.text and "tool.jinja" in caplog.text


def fake_hub_cache(dense: Path, cache: Path, repo: str = "org/name", revision: str = "0" * 40) -> Path:
    """The Hub cache layout: models--org--name/snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "blobs").mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(revision)
    snapshot = entry / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(dense.iterdir())):
        blob = entry / "blobs" / f"{i:064x}"
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot


def test_hub_cache_snapshots_link_into_their_own_blobs(source, tmp_path, monkeypatch, caplog):
    (source / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (source / "chat_template.jinja").write_text("{{ messages }}")
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(source, cache)
    other = fake_hub_cache(source, cache, repo="other/repo")
    (snapshot / "vocab.txt").symlink_to(other / "chat_template.jinja")  # another repo's blob: not this source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sources, "snapshot_download", _offline_snapshot_download(cache))
    for given in (snapshot, "org/name"):  # the snapshot folder, or the Hub id through the cache
        output = upcycle_checkpoint(given, tmp_path / "out", overwrite=True, **OPTIONS)
        assert (output / "tokenizer_config.json").read_text() == json.dumps({"model_max_length": 64})
        assert (output / "chat_template.jinja").read_text() == "{{ messages }}"
        assert not (output / "vocab.txt").exists()
    assert "vocab.txt" in caplog.text


def _offline_snapshot_download(cache: Path):
    from huggingface_hub import snapshot_download

    def download(repo_id, **kwargs):
        return snapshot_download(repo_id, cache_dir=cache, local_files_only=True, **kwargs)

    return download


# --- 4. non-finite numbers ------------------------------------------------------------------------------------

NON_FINITE_FLAGS = [
    ("--noise-std", "nan", ["--expert-init", "noise"]),
    ("--noise-std", "inf", ["--expert-init", "noise"]),
    ("--drop-ratio", "nan", ["--expert-init", "drop"]),
    ("--capacity-factor", "nan", []),
    ("--capacity-factor", "inf", []),
    ("--eval-capacity-factor", "inf", []),
    ("--router-z-loss-coef", "nan", []),
    ("--router-aux-loss-coef", "inf", []),
    ("--router-jitter-noise", "nan", []),
    ("--expert-dropout", "nan", []),
    ("--router-init-std", "inf", []),
    ("--threshold-ema-decay", "nan", ["--routing", "expert_choice"]),
    ("--capacity-factor", "-inf", ["--routing", "expert_choice"]),
]


@pytest.mark.parametrize("flag, value, extra", NON_FINITE_FLAGS, ids=[f"{f}={v}" for f, v, _ in NON_FINITE_FLAGS])
def test_cli_refuses_non_finite_numbers(flag, value, extra, source, tmp_path, capsys):
    assert main(upcycle_argv(source, tmp_path / "out", *extra, f"{flag}={value}")) == 2
    assert f"{flag} must be a finite number" in capsys.readouterr().err
    assert leftovers(tmp_path) == ["dense"]


SWITCH_NUMBERS = ["capacity_factor", "eval_capacity_factor", "router_jitter_noise", "router_aux_loss_coef"]
SHARED_NUMBERS = ["router_z_loss_coef", "expert_dropout", "router_init_std"]
CONFIG_NUMBERS = [(SwitchMoeConfig, n) for n in SWITCH_NUMBERS + SHARED_NUMBERS] + [
    (ExpertChoiceMoeConfig, n) for n in ["capacity_factor", "threshold_ema_decay", *SHARED_NUMBERS]
]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("config_class, field", CONFIG_NUMBERS, ids=[f"{c.__name__}.{f}" for c, f in CONFIG_NUMBERS])
def test_configs_refuse_non_finite_numbers(config_class, field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a finite number .*, got {value!r}"):
        config_class(text_config=tiny_config("llama"), **{field: value})


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(expert_init="noise", noise_std=math.nan), "noise_std must be a finite number >= 0, got nan"),
        (dict(expert_init="drop", drop_ratio=math.inf), r"drop_ratio must be a finite number in \[0, 1\], got inf"),
        (dict(capacity_factor=math.inf), "capacity_factor must be a finite number > 0 or 'dropless'"),
        (dict(max_shard_size=math.nan), "max_shard_size must be a positive size .*, got nan"),
    ],
)
def test_api_refuses_non_finite_numbers(options, message, source, tmp_path):
    with pytest.raises(ValueError, match=message):
        upcycle_checkpoint(source, tmp_path / "out", **{**OPTIONS, **options})
    assert leftovers(tmp_path) == ["dense"]


# --- 5. non-finite source weights --------------------------------------------------------------------------


def poison(value):
    def edit(tensor):
        tensor = tensor.clone()
        tensor.view(-1)[:3] = value
        return tensor

    return edit


@pytest.mark.parametrize(
    "name, value, found",
    [("model.layers.1.mlp.up_proj.weight", math.nan, "3 NaN"), ("model.embed_tokens.weight", math.inf, "3 inf")],
)
def test_non_finite_source_weights_are_refused_naming_the_tensor(name, value, found, source, tmp_path, capsys):
    rewrite_tensor(source, name, poison(value))
    assert main(upcycle_argv(source, tmp_path / "out", "--verify")) == 2
    err = capsys.readouterr().err
    assert f"{name} in " in err and found in err and "Verification failed" not in err
    assert leftovers(tmp_path) == ["dense"]


def test_in_memory_non_finite_weights_are_refused():
    dense = tiny_dense("llama")
    with torch.no_grad():
        dense.model.layers[1].mlp.down_proj.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight .*1 NaN"):
        upcycle_model(dense, num_experts=2)


def test_export_refuses_non_finite_weights_naming_the_tensor(save_dense, tmp_path):
    _, dense = save_dense("qwen3", name="dense")
    moe = upcycle_checkpoint(dense, tmp_path / "moe", **OPTIONS)
    name = "backbone.model.layers.1.mlp.experts.up_proj.weight"
    rewrite_tensor(moe, name, poison(math.nan))
    with pytest.raises(ValueError, match=rf"{name} in .* 3 NaN"):
        export_checkpoint(moe, tmp_path / "out", progress=False)
    assert leftovers(tmp_path) == ["dense", "moe"]


# --- 6. other gaps ----------------------------------------------------------------------------------------------


def test_export_refuses_integer_expert_weights(save_dense, tmp_path, capsys):
    _, dense = save_dense("qwen3", name="dense")
    moe = upcycle_checkpoint(dense, tmp_path / "moe", **OPTIONS)
    name = "backbone.model.layers.1.mlp.experts.gate_proj.weight"
    rewrite_tensor(moe, name, lambda t: t.mul(100).to(torch.int8))
    assert main(["export", str(moe), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{name} is int8" in err and "PASSED" not in err
    assert leftovers(tmp_path) == ["dense", "moe"]


def test_import_refuses_integer_expert_weights(tmp_path):
    save_native("qwen3_moe", tmp_path / "native")
    tensors = load_file(tmp_path / "native" / "model.safetensors")
    name = next(k for k in tensors if ".mlp.experts." in k)
    rewrite_tensor(tmp_path / "native", name, lambda t: t.mul(100).to(torch.int8))
    with pytest.raises(TypeError, match=rf"{name} is int8"):
        import_checkpoint(tmp_path / "native", tmp_path / "out", progress=False)
    assert leftovers(tmp_path) == ["native"]


def test_a_config_edited_to_another_mlp_size_is_diagnosed(source, tmp_path):
    output = upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)
    config = json.loads((output / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 40
    (output / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as caught:
        AutoModelForCausalLM.from_pretrained(output)
    message = str(caught.value)
    assert "but the weights have 2 experts" not in message
    assert "experts.down_proj.weight is [2, 32, 48] in the checkpoint, the config implies [2, 32, 40]" in message


@pytest.mark.parametrize("extra", [[], ["--format", "native", "--moe-layers", "all"]], ids=["hf_moe", "native"])
def test_an_output_under_proc_is_not_a_disk_space_problem(extra, source, capsys):
    assert main(upcycle_argv(source, "/proc/hf-moe-out", *extra)) == 2
    err = capsys.readouterr().err
    assert "No disk space" not in err and "OUTPUT_DIR '/proc/hf-moe-out'" in err and "/proc" in err


def _run_in_child(argv):
    torch.set_num_threads(1)  # see test_faults._convert_in_child
    sys.exit(main(argv))


def test_an_absurd_layer_count_fails_fast(source, tmp_path, capfd):
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = 200_000
    (source / "config.json").write_text(json.dumps(config))
    child = FORK.Process(target=_run_in_child, args=(upcycle_argv(source, tmp_path / "out"),))
    start = time.monotonic()
    child.start()
    status = test_faults.join_or_kill(child, 60)
    err = capfd.readouterr().err
    assert status == 2, f"no answer after {time.monotonic() - start:.0f} s"
    assert "num_hidden_layers=200000" in err and "holds only" in err
    assert time.monotonic() - start < 30


def test_output_inside_the_source_is_refused(source, capsys):
    before = leftovers(source)
    assert main(upcycle_argv(source, source / "moe")) == 2
    assert "OUTPUT_DIR" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"output_dir=.*/dense/moe' must not be inside source=.*dense'"):
        upcycle_checkpoint(source, source / "moe", **OPTIONS)
    assert leftovers(source) == before


# --- 14. fault-test children and SIGINT ------------------------------------------------------------------------


def test_sigint_reaches_the_child_when_the_parent_ignores_it(source, tmp_path, capfd):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a shell's background job
    try:
        status = run_and_signal("writing", signal.SIGINT, upcycle_argv(source, tmp_path / "out"))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == 130 and "interrupted" in capfd.readouterr().err
    assert leftovers(tmp_path) == ["dense"]


def test_a_child_that_outlives_its_join_is_killed():
    child = FORK.Process(target=time.sleep, args=(120,))
    child.start()
    assert test_faults.join_or_kill(child, 0.5) is None
    assert not child.is_alive() and child.exitcode == -signal.SIGKILL
