"""Dense checkpoint -> MoE checkpoint -> from_pretrained: exact for function-preserving settings."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import ROUND_TRIP_TYPES, VOCAB, tiny_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

import hf_moe  # noqa: F401  (registers the architectures)
from hf_moe import upcycle_checkpoint

TOLERANCE = 1e-5


def relative_error(actual, expected) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def load(folder):
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("model_type", ROUND_TRIP_TYPES)
def test_copy_upcycling_computes_the_dense_function(model_type, sharded, save_dense, tmp_path):
    dense, source = save_dense(model_type, sharded=sharded)
    output = upcycle_checkpoint(
        source,
        tmp_path / "moe",
        num_experts=4,
        num_experts_per_tok=2,
        max_shard_size="30KB" if sharded else "5GB",
        progress=False,
    )
    moe, info = load(output)
    assert type(moe).__name__ == "SwitchMoeForCausalLM"
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    assert (output / "model.safetensors.index.json").is_file() == sharded
    assert len(moe.moe_blocks()) == 1  # every_other of 3 layers: layer 1

    input_ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(moe(input_ids).logits, dense(input_ids).logits) <= TOLERANCE
    prompt = input_ids[:1, :4]
    generated = moe.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, dense.generate(prompt, max_new_tokens=6, do_sample=False))


def test_tied_embeddings_stay_tied_and_are_not_written(save_dense, tmp_path):
    dense, source = save_dense("gpt2")
    assert dense.config.tie_word_embeddings
    output = upcycle_checkpoint(source, tmp_path / "moe", num_experts=2, progress=False)
    with safe_open(output / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "backbone.lm_head.weight" not in names and "backbone.transformer.wte.weight" in names
    moe, _ = load(output)
    assert moe.backbone.lm_head.weight.data_ptr() == moe.backbone.transformer.wte.weight.data_ptr()


def test_expert_choice_threshold_mode_is_exact(save_dense, tmp_path):
    dense, source = save_dense("llama")
    output = upcycle_checkpoint(
        source, tmp_path / "moe", routing="expert_choice", num_experts=4, moe_layers="all", progress=False
    )
    moe, info = load(output)
    assert type(moe).__name__ == "ExpertChoiceMoeForCausalLM" and not info["missing_keys"]
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(moe(input_ids).logits, dense(input_ids).logits) <= TOLERANCE


def test_raw_switch_gate_is_not_exact_and_verify_measures_it(save_dense, tmp_path):
    """Top-1 with the raw gate scales each MoE output by p_max ~ 1/E (Switch eq. 2): not exact,
    and --verify reports that deviation instead of failing."""
    dense, source = save_dense("llama")
    output = upcycle_checkpoint(
        source, tmp_path / "moe", num_experts=8, norm_topk_prob=False, verify=True, progress=False
    )
    verification = json.loads((output / "config.json").read_text())["upcycling"]["verification"]
    assert verification["function_preserving"] is False and verification["passed"] is True
    assert verification["layer_max_relative_deviation"]["1"] > 0.5  # output scaled by about 1/8
    assert verification["model_max_relative_deviation"] > TOLERANCE


def test_bfloat16_output_and_verification(save_dense, tmp_path):
    dense, source = save_dense("qwen3", sharded=True)
    output = upcycle_checkpoint(
        source, tmp_path / "moe", num_experts=4, moe_layers=[0, 2], dtype="bfloat16", verify=True, progress=False
    )
    config = json.loads((output / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["moe_layers"] == [0, 2]
    verification = config["upcycling"]["verification"]
    assert verification["function_preserving"] and verification["passed"]
    assert set(verification["layer_max_relative_deviation"]) == {"0", "2"}
    assert verification["model_max_relative_deviation"] <= TOLERANCE
    moe, _ = load(output)
    assert moe.backbone.model.layers[0].mlp.experts.gate_proj.weight.dtype == torch.bfloat16


def test_bin_checkpoint_is_read_with_torch_load(save_dense, tmp_path):
    dense, _ = save_dense("llama")
    source = tmp_path / "bin"
    dense.config.save_pretrained(source)
    torch.save(dense.state_dict(), source / "pytorch_model.bin")
    output = upcycle_checkpoint(source, tmp_path / "moe", num_experts=2, verify=True, progress=False)
    verification = json.loads((output / "config.json").read_text())["upcycling"]["verification"]
    assert verification["passed"] and verification["model_max_relative_deviation"] <= TOLERANCE


def test_tokenizer_generation_config_and_chat_template_are_copied(save_dense, tmp_path):
    dense, source = save_dense("llama")
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="w0", pad_token="w0", bos_token="w1", eos_token="w2"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(source)
    output = upcycle_checkpoint(source, tmp_path / "moe", num_experts=2, progress=False)

    copied = AutoTokenizer.from_pretrained(output)
    assert copied("w5 w7 w9").input_ids == tokenizer("w5 w7 w9").input_ids
    assert copied.chat_template == tokenizer.chat_template
    assert json.loads((output / "generation_config.json").read_text()) == json.loads(
        (source / "generation_config.json").read_text()
    )


def test_config_records_the_conversion(save_dense, tmp_path):
    dense, source = save_dense("llama")
    output = upcycle_checkpoint(
        source, tmp_path / "moe", num_experts=4, expert_init="drop", drop_ratio=0.25, seed=7, progress=False
    )
    config = json.loads((output / "config.json").read_text())
    upcycling = config["upcycling"]
    assert upcycling["source"] == str(source.resolve()) and upcycling["revision"] is None
    assert upcycling["expert_init"] == "drop" and upcycling["drop_ratio"] == 0.25 and upcycling["seed"] == 7
    assert (
        set(upcycling["source_sha256"]) == {"model.safetensors"}
        and len(upcycling["source_sha256"]["model.safetensors"]) == 64
    )
    assert config["auto_map"]["AutoModelForCausalLM"] == "switch.SwitchMoeForCausalLM"
    code = {"switch.py", "configuration_moe.py", "modeling_moe.py", "routing.py", "experts.py"}
    assert code <= {p.name for p in output.iterdir()}


@pytest.mark.parametrize(
    "auto_class, expected",
    [(AutoModel, "SwitchMoeModel"), (AutoModelForSequenceClassification, "SwitchMoeForSequenceClassification")],
)
def test_the_checkpoint_head_is_kept(auto_class, expected, tmp_path):
    torch.manual_seed(0)
    dense = auto_class.from_config(tiny_config("qwen3", num_labels=3)).eval()
    dense.save_pretrained(tmp_path / "dense")
    output = upcycle_checkpoint(
        tmp_path / "dense", tmp_path / "moe", num_experts=4, num_experts_per_tok=2, verify=True, progress=False
    )
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == [expected] and expected in config["auto_map"][auto_class.__name__]
    assert config["upcycling"]["verification"]["model_max_relative_deviation"] <= TOLERANCE
    model, info = auto_class.from_pretrained(output, output_loading_info=True)
    assert type(model).__name__ == expected and not any(info.values())
