"""Every bad input gives a clear error, leaves no output directory and never touches existing files."""

import errno
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TINY_CONFIGS, leftovers, tiny_config, tiny_dense
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

import hf_moe.checkpoints.staging as staging
import hf_moe.upcycling.convert as convert
import hf_moe.upcycling.weights as weights
from hf_moe import upcycle_checkpoint, upcycle_model
from hf_moe.upcycling import VerificationError


@pytest.fixture
def llama(save_dense):
    return save_dense("llama", name="dense")[1]


def convert_fails(source, output, error, match, **options):
    before = leftovers(output.parent)
    with pytest.raises(error, match=match):
        upcycle_checkpoint(source, output, num_experts=4, progress=False, **options)
    assert leftovers(output.parent) == before, "a failed conversion must leave nothing behind"


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_shard_named_in_the_index(save_dense, tmp_path):
    _, source = save_dense("llama", sharded=True, name="dense")
    (source / "model-00002-of-00007.safetensors").unlink()
    convert_fails(
        source,
        tmp_path / "out",
        FileNotFoundError,
        r"Shard\(s\) \['model-00002-of-00007.safetensors'\] named in .*index.json do not exist",
    )


def _rewrite_weights(folder, data: bytes):
    (folder / "model.safetensors").write_bytes(data)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda raw: raw[:5], "the file has 5 bytes, fewer than the 8-byte header length"),
        (lambda raw: struct.pack("<Q", 10**12) + raw[8:], "header length 1000000000000 exceeds the file size"),
        (lambda raw: raw[:8] + b"{not json" + raw[17:], "the header is not valid JSON"),
        (lambda raw: raw[: len(raw) // 2], "do not fit its shape"),
    ],
    ids=["too-short", "header-length", "json", "truncated-data"],
)
def test_corrupt_safetensors_header(corrupt, message, llama, tmp_path):
    raw = (llama / "model.safetensors").read_bytes()
    _rewrite_weights(llama, corrupt(raw))
    convert_fails(
        llama, tmp_path / "out", ValueError, f"Corrupt safetensors header in .*model.safetensors: .*{message}"
    )


def test_unknown_model_type_lists_the_supported_ones(llama, tmp_path):
    edit_config(llama, model_type="not_a_model")
    convert_fails(
        llama,
        tmp_path / "out",
        ValueError,
        r"Unknown architecture: cannot upcycle model_type 'not_a_model'.*"
        r"'llama', 'mistral', 'qwen2', 'qwen3', 'gemma3_text', 'phi3', 'olmo2', 'gpt2'",
    )


def test_architecture_without_a_dense_feed_forward_block(tmp_path):
    source = tmp_path / "mamba"
    config = AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=2, vocab_size=96, state_size=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    convert_fails(
        source,
        tmp_path / "out",
        ValueError,
        r"Unknown architecture: cannot upcycle model_type 'mamba' \(Cannot find the feed-forward blocks.*"
        r"Supported \(tested\)",
    )


def test_already_moe_source(llama, tmp_path):
    edit_config(llama, model_type="switch_moe")
    convert_fails(llama, tmp_path / "out", ValueError, "already an hf_moe model")


@pytest.mark.parametrize(
    "model_type, experts",
    [("mixtral", {"num_local_experts": 4}), ("qwen3_moe", {"num_experts": 4, "head_dim": 8})],
)
def test_native_moe_source_points_to_import(model_type, experts, tmp_path):
    source = tmp_path / model_type
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS["llama"], **experts)
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    found = "num_local_experts=4"  # both configs save their expert count under this name
    convert_fails(
        source,
        tmp_path / "out",
        ValueError,
        rf"The source is already a Mixture-of-Experts model \(model_type '{model_type}', {found}\); upcycling turns "
        r"a dense checkpoint into an MoE one\. `hf-moe import SOURCE OUTPUT_DIR` turns native \['qwen3_moe', 'mixtral'",
    )


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8])
def test_integer_weights_are_refused_naming_tensor_and_dtype(dtype, llama, tmp_path):
    tensors = load_file(llama / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = (tensors[name] * 100).to(dtype)
    save_file(tensors, llama / "model.safetensors", metadata={"format": "pt"})
    convert_fails(
        llama,
        tmp_path / "out",
        TypeError,
        rf"non-floating-point weights where the llama model has floating-point ones .*\n  - {name} is "
        rf"{str(dtype).removeprefix('torch.')}",
        verify=True,
    )


def test_in_memory_integer_weights_are_refused():
    dense = tiny_dense("llama")
    mlp = dense.model.layers[0].mlp
    mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight.data.to(torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match=r"model\.layers\.0\.mlp\.down_proj\.weight is int32"):
        upcycle_model(dense, num_experts=4)


def test_top_k_larger_than_num_experts(llama, tmp_path):
    convert_fails(
        llama,
        tmp_path / "out",
        ValueError,
        r"num_experts_per_tok must be between 1 and num_experts \(4\), got 5",
        num_experts_per_tok=5,
    )


def test_layer_indices_out_of_range(llama, tmp_path):
    convert_fails(
        llama,
        tmp_path / "out",
        ValueError,
        r"moe_layers must be between 0 and 2 \(num_hidden_layers=3\), got \[3\]",
        moe_layers=[1, 3],
    )


def test_mismatched_shapes(llama, tmp_path):
    edit_config(llama, intermediate_size=40)
    convert_fails(
        llama,
        tmp_path / "out",
        ValueError,
        r"(?s)Mismatched shapes.*model.layers.0.mlp.gate_proj.weight is \[48, 32\], the config implies \[40, 32\]",
    )


def test_missing_and_unexpected_tensors(llama, tmp_path):
    tensors = load_file(llama / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, llama / "model.safetensors", metadata={"format": "pt"})
    convert_fails(
        llama,
        tmp_path / "out",
        ValueError,
        r"missing tensors the llama config requires: model.layers.1.mlp.up_proj.weight\n"
        r".*unexpected tensors the llama config does not have: model.layers.1.mlp.extra.weight",
    )


def test_no_disk_space_before_writing(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    convert_fails(
        llama, tmp_path / "out", OSError, r"No disk space: the MoE checkpoint needs 173\.4 kB but only 1\.0 kB are free"
    )


def test_disk_full_while_writing(llama, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "write_sharded_safetensors", full)
    convert_fails(llama, tmp_path / "out", OSError, "No disk space left on .* while writing")


def test_non_empty_output_is_refused_and_kept(llama, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")
    convert_fails(llama, output, FileExistsError, r"output_dir='.*out' is not empty; pass overwrite=True to replace")
    assert (output / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_only_when_complete(llama, tmp_path, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(weights, "expert_copy", interrupted)
        with pytest.raises(KeyboardInterrupt):
            upcycle_checkpoint(llama, output, num_experts=2, overwrite=True, progress=False)
    assert leftovers(tmp_path) == ["dense", "out"] and leftovers(output) == ["keep.txt"]
    upcycle_checkpoint(llama, output, num_experts=2, overwrite=True, progress=False)
    assert "keep.txt" not in leftovers(output) and (output / "model.safetensors").is_file()
    assert leftovers(tmp_path) == ["dense", "out"]


def test_empty_output_dir_is_used(llama, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    assert upcycle_checkpoint(llama, output, num_experts=2, progress=False) == output
    assert (output / "config.json").is_file()


def test_output_must_not_be_the_source(llama, tmp_path):
    convert_fails(
        llama, llama, ValueError, r"output_dir='.*dense' must not be or contain source='.*dense'", overwrite=True
    )


def test_output_path_is_a_file(llama, tmp_path):
    (tmp_path / "out").write_text("x")
    convert_fails(llama, tmp_path / "out", FileExistsError, "exists and is not a directory")


def test_failed_verification_leaves_nothing(llama, tmp_path, monkeypatch):
    real = weights.expert_copy
    monkeypatch.setattr(weights, "expert_copy", lambda dense, *args: real(dense, *args) * 1.01)  # silently off by 1%
    convert_fails(
        llama,
        tmp_path / "out",
        VerificationError,
        r"(?s)Verification failed.*layer   1: max relative deviation \S+.*FAILED",
        verify=True,
    )


@pytest.mark.parametrize(
    "source, error, message",
    [
        ("missing/dir/../x", FileNotFoundError, "is neither an existing directory nor a Hub repository id"),
        (
            "not-cached/model",
            FileNotFoundError,
            "could not be fetched from the Hugging Face Hub .*"
            "Offline, the model must already be in the local Hub cache",
        ),
    ],
)
def test_unreachable_sources(source, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    convert_fails(source, tmp_path / "out", error, message)


def test_source_is_a_file(llama, tmp_path):
    convert_fails(
        llama / "config.json", tmp_path / "out", FileNotFoundError, "is a file; pass the checkpoint directory"
    )


def test_source_without_weights(tmp_path, llama):
    (llama / "model.safetensors").unlink()
    convert_fails(
        llama,
        tmp_path / "out",
        FileNotFoundError,
        "No weights in .*: looked for model.safetensors.index.json, model.safetensors",
    )


def test_bin_with_non_tensor_pickle_is_refused(llama, tmp_path):
    (llama / "model.safetensors").unlink()
    torch.save({"x": os.getcwd}, llama / "pytorch_model.bin")  # an arbitrary callable: weights_only refuses it
    convert_fails(
        llama, tmp_path / "out", ValueError, r"Cannot read .*pytorch_model.bin with torch.load\(weights_only=True\)"
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"routing": "hash"}, r"routing must be one of \['switch', 'expert_choice', 'aux_free'\], got 'hash'"),
        ({"expert_init": "zeros"}, r"expert_init must be one of \['copy', 'noise', 'drop'\], got 'zeros'"),
        ({"drop_ratio": 1.5}, r"drop_ratio must be a finite number in \[0, 1\], got 1.5"),
        ({"noise_std": -1}, r"noise_std must be a finite number >= 0, got -1"),
        ({"seed": -3}, r"seed must be an integer >= 0, got -3"),
        ({"dtype": "int8"}, r"dtype must be one of \['bfloat16', 'float16', 'float32'\] or None .*got 'int8'"),
        ({"max_shard_size": "lots"}, r"max_shard_size must be a positive size such as '5GB'.*got 'lots'"),
        (
            {"routing": "expert_choice", "num_experts_per_tok": 2},
            r"num_experts_per_tok is not a setting of routing='expert_choice' \(ExpertChoiceMoeConfig\)",
        ),
        ({"capacity_factor": 0}, r"capacity_factor must be a finite number > 0 or 'dropless' \(no limit\), got 0"),
        ({"revision": "main"}, r"revision applies to Hub ids only"),
    ],
)
def test_bad_options(options, message, llama, tmp_path):
    convert_fails(llama, tmp_path / "out", ValueError, message, **options)


def test_in_memory_model_with_an_unsupported_head():
    dense = AutoModelForTokenClassification.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match=r"Cannot upcycle architecture 'LlamaForTokenClassification': supported heads"):
        upcycle_model(dense, num_experts=2)


def test_in_memory_settings_are_validated_together():
    with pytest.raises(ValueError, match=r"(?s)routing must be one of.*expert_init must be one of"):
        upcycle_model(tiny_dense("llama"), routing="x", expert_init="y")
