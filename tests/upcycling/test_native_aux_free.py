"""Export of auxiliary-loss-free (``--routing aux_free``) checkpoints to transformers' DeepSeek-V3-style
bias-routed families, glm4_moe (llama backbone) and dots1 (qwen3 backbone), and import back: the selection
biases become ``e_score_correction_bias``, the exported model computes the same function in stock
transformers, and what the native router cannot compute is refused with the option to change."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, tiny_dense
from transformers import AutoConfig, AutoModelForCausalLM

import hf_moe
from hf_moe import export_checkpoint, import_checkpoint, upcycle_checkpoint
from hf_moe.upcycling.native import FAMILIES_BY_NATIVE, expert_intermediate_size, supported_mappings

MAX_ABS = 1e-6  # measured: 1.8e-7 (glm4_moe), 9e-8 (dots1), on logits of magnitude 0.6
SETTINGS = dict(
    routing="aux_free", num_experts=4, num_experts_per_tok=2, expert_init="noise", noise_std=0.5, router_init_std=0.5
)
# name -> (dense backbone, upcycling settings, native model_type, its dense layers)
EXPORTS = {
    "glm4_moe-last-half": ("llama", dict(moe_layers="last_half"), "glm4_moe", 1),
    "glm4_moe-all-raw-gates": ("llama", dict(moe_layers="all", norm_topk_prob=False), "glm4_moe", 0),
    "dots1-all": ("qwen3", dict(moe_layers="all"), "dots1", 0),
    "dots1-suffix-list-top-3": ("qwen3", dict(moe_layers=[1, 2], num_experts_per_tok=3), "dots1", 1),
}
INPUT_IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(INPUT_IDS)
MASK[1, :3] = 0  # left padding
PROMPT = INPUT_IDS[:1, :4]

# Runs in a fresh interpreter without hf_moe: the stock Auto class, as a user of the export would.
NATIVE_RUN = """
import sys
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
folder, inputs, output = sys.argv[1:]
model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
model.eval()
data = torch.load(inputs)
with torch.no_grad():
    result = {
        "class": type(model).__module__ + "." + type(model).__name__,
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "logits": model(data["input_ids"]).logits,
        "masked_logits": model(data["input_ids"], attention_mask=data["mask"]).logits,
        "generated": model.generate(data["prompt"], max_new_tokens=8, do_sample=False),
        "hf_moe_imported": any(name.split(".")[0] == "hf_moe" for name in sys.modules),
    }
torch.save(result, output)
"""


def run_native(folder, tmp_path) -> dict:
    inputs, output = tmp_path / "inputs.pt", tmp_path / "native_outputs.pt"
    torch.save({"input_ids": INPUT_IDS, "mask": MASK, "prompt": PROMPT}, inputs)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run([sys.executable, "-c", NATIVE_RUN, str(folder), str(inputs), str(output)], check=True, env=env)
    return torch.load(output)


@torch.no_grad()
def outputs_of(model) -> dict:
    return {
        "logits": model(INPUT_IDS).logits,
        "masked_logits": model(INPUT_IDS, attention_mask=MASK).logits,
        "generated": model.generate(PROMPT, max_new_tokens=8, do_sample=False),
    }


def max_deviation(expected: dict, actual: dict) -> float:
    """Largest logit difference over every position, and over the real (non-padding) tokens of the padded batch:
    hf_moe routes no padding token, the native block does, so padding positions are not compared."""
    full = (actual["logits"] - expected["logits"]).abs().max().item()
    masked = (actual["masked_logits"] - expected["masked_logits"])[MASK.bool()].abs().max().item()
    return max(full, masked)


def trained_aux_free_model(dense_folder, folder, **settings):
    """An upcycled aux_free model as training leaves it: non-zero selection biases large enough to change the picks,
    and routers moved off their upcycled values. Returns (model, the same model with zero biases)."""
    upcycled = upcycle_checkpoint(dense_folder, folder, progress=False, **{**SETTINGS, **settings})
    model = AutoModelForCausalLM.from_pretrained(upcycled).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.moe_blocks():
            router = block.router
            router.expert_bias.copy_(torch.randn(router.num_experts, generator=generator) * 0.5)
            router.weight.add_(torch.randn(router.weight.shape, generator=generator) * 0.1)
    model.save_pretrained(folder)
    unbiased = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        for block in unbiased.moe_blocks():
            block.router.expert_bias.zero_()
    return model, unbiased


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_computes_the_same_function_in_stock_transformers_and_imports_back(case, save_dense, tmp_path):
    model_type, settings, native_type, dense_layers = EXPORTS[case]
    _, dense_folder = save_dense(model_type)
    moe, unbiased = trained_aux_free_model(dense_folder, tmp_path / "moe", **settings)
    expected = outputs_of(moe)
    # The biases decide the picks: without them the model computes something else.
    assert (outputs_of(unbiased)["logits"] - expected["logits"]).abs().max() > 1e-3

    native_folder = export_checkpoint(tmp_path / "moe", tmp_path / "native", progress=False)
    config = json.loads((native_folder / "config.json").read_text())
    assert config["model_type"] == native_type and config["first_k_dense_replace"] == dense_layers
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == (1, 1, 1.0)
    assert config["norm_topk_prob"] is moe.config.norm_topk_prob and config["n_shared_experts"] == 1
    assert config["hf_moe_export"]["verification"]["tensors_bit_exact"] is True
    assert "auto_map" not in config and not list(native_folder.glob("*.py"))
    tensors = load_file(native_folder / "model.safetensors")
    for index, block in zip(moe.config.moe_layers, moe.moe_blocks(), strict=True):
        bias = tensors[f"model.layers.{index}.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32 and torch.equal(bias, block.router.expert_bias)
    assert not any("bias_updates" in name for name in tensors)
    # No hf_moe shared expert: one all-zero native shared expert of the experts' width (vLLM needs one).
    shared = {name: tensor for name, tensor in tensors.items() if ".shared_experts." in name}
    assert len(shared) == 3 * len(moe.config.moe_layers) and all(not tensor.any() for tensor in shared.values())
    width, hidden = expert_intermediate_size(moe.config), moe.config.text_config.hidden_size
    assert {tuple(tensor.shape) for tensor in shared.values()} == {(width, hidden), (hidden, width)}

    native = run_native(native_folder, tmp_path)
    class_name = FAMILIES_BY_NATIVE[native_type].class_name(1)
    assert native["class"] == f"transformers.models.{native_type}.modeling_{native_type}.{class_name}"
    assert native["hf_moe_imported"] is False
    assert native["missing"] == [] and native["unexpected"] == []
    assert max_deviation(expected, native) <= MAX_ABS
    assert torch.equal(native["generated"], expected["generated"])

    back_folder = import_checkpoint(native_folder, tmp_path / "back", progress=False)
    back = AutoModelForCausalLM.from_pretrained(back_folder).eval()
    assert type(back) is hf_moe.AuxFreeMoeForCausalLM
    assert (back.config.scoring_func, back.config.moe_layers) == ("sigmoid", moe.config.moe_layers)
    assert back.config.norm_topk_prob is moe.config.norm_topk_prob
    for ours, theirs in zip(moe.moe_blocks(), back.moe_blocks(), strict=True):
        assert torch.equal(ours.router.expert_bias, theirs.router.expert_bias)
        assert torch.equal(ours.router.weight, theirs.router.weight)
    # The all-zero shared expert comes back as an ungated one: the same function up to float rounding (its zero
    # output is added in another order of operations).
    assert (back.config.shared_expert_intermediate_size, back.config.shared_expert_gate) == (width, False)
    assert max_deviation(expected, outputs_of(back)) <= MAX_ABS


def test_an_ungated_whole_ffn_shared_expert_is_one_native_shared_expert(save_dense, tmp_path):
    _, dense_folder = save_dense("qwen3")
    moe, _ = trained_aux_free_model(dense_folder, tmp_path / "moe", moe_layers="all", shared_expert=True)
    native_folder = export_checkpoint(tmp_path / "moe", tmp_path / "native", progress=False)
    assert json.loads((native_folder / "config.json").read_text())["n_shared_experts"] == 1
    tensors = load_file(native_folder / "model.safetensors")
    shared = moe.moe_blocks()[0].shared_expert.down_proj.weight
    assert torch.equal(tensors["model.layers.0.mlp.shared_experts.down_proj.weight"], shared)  # not rescaled
    native = run_native(native_folder, tmp_path)
    assert native["missing"] == [] and native["unexpected"] == []
    expected = outputs_of(moe)
    assert max_deviation(expected, native) <= MAX_ABS
    assert torch.equal(native["generated"], expected["generated"])
    back = AutoModelForCausalLM.from_pretrained(import_checkpoint(native_folder, tmp_path / "back", progress=False))
    assert (back.config.shared_expert_intermediate_size, back.config.shared_expert_gate) == (48, False)
    assert max_deviation(expected, outputs_of(back.eval())) == 0.0


# Native checkpoints as people have them: random weights and biases from a tiny native config.
def save_native(model_type, folder, **overrides):
    fields = dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=1, n_shared_experts=0, norm_topk_prob=True, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    if model_type == "glm4_moe":
        fields.update(partial_rotary_factor=1.0, num_mtp_layers=0)
    config = AutoConfig.for_model(model_type, **{**fields, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.3)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("model_type", ["glm4_moe", "dots1"])
def test_native_checkpoints_import_and_export_back_bit_exact(model_type, tmp_path):
    native = save_native(model_type, tmp_path / "native")
    imported = import_checkpoint(tmp_path / "native", tmp_path / "hf_moe", progress=False)
    config = json.loads((imported / "config.json").read_text())
    assert config["model_type"] == "aux_free_moe" and config["scoring_func"] == "sigmoid"
    assert config["moe_layers"] == [1, 2] and config["moe_intermediate_size"] == 24
    moe = AutoModelForCausalLM.from_pretrained(imported).eval()
    assert max_deviation(outputs_of(native), outputs_of(moe)) <= MAX_ABS

    exported = export_checkpoint(imported, tmp_path / "again", progress=False)
    original, again = load_file(tmp_path / "native" / "model.safetensors"), load_file(exported / "model.safetensors")
    # The width-0 shared experts (n_shared_experts=0) come back as one all-zero shared expert each.
    empty = {name for name, tensor in original.items() if tensor.numel() == 0}
    assert empty and original.keys() == again.keys()
    assert all(not again[name].any() and again[name].numel() > 0 for name in empty)
    assert all(torch.equal(original[name], again[name]) for name in original.keys() - empty)


def refused(call, match, tmp_path, output="out"):
    with pytest.raises(ValueError, match=match):
        call()
    assert not (tmp_path / output).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{output}")]


@pytest.mark.parametrize(
    "model_type, settings, message",
    [
        (
            "llama",
            dict(scoring_func="softmax", moe_layers="all"),
            r"glm4_moe routes with scoring_func='sigmoid', this model has scoring_func='softmax': upcycle with "
            r"scoring_func='sigmoid'",
        ),
        (
            "qwen3",
            dict(eval_capacity_factor=1.0, moe_layers="all"),
            "evaluation capacity factor 1.0 drops tokens; native models are dropless",
        ),
        (
            "qwen3",
            dict(moe_layers="every_other"),
            r"dots1 makes every layer from first_k_dense_replace to the last MoE, so moe_layers must be the last "
            r"layers without gaps \('all', 'last_half' or a list ending at layer 2\), got moe_layers \[1\]",
        ),
        ("llama", dict(moe_layers=[0, 1]), r"got moe_layers \[0, 1\]: upcycle with moe_layers='all' or 'last_half'"),
        (
            "llama",
            dict(moe_layers="all", shared_expert=True, shared_expert_gate=True),
            r"glm4_moe adds its shared experts ungated, this model gates its shared expert \(shared_expert_gate=True\)",
        ),
        (
            "qwen3",
            dict(moe_layers="all", shared_expert=True, shared_expert_size=16),
            r"dots1's shared experts are n_shared_experts x moe_intermediate_size \(48\) neurons wide, this model's "
            r"shared expert has 16",
        ),
        (
            "mistral",
            dict(moe_layers="all"),
            r"backbone 'mistral' has no native MoE counterpart with routing 'aux_free': .* --routing switch "
            r"\(mixtral\)",
        ),
        ("qwen2", dict(moe_layers="all"), r"--routing switch \(qwen2_moe\)"),
        ("llama", dict(moe_layers="all", attention_bias=True), "glm4_moe has no attention_bias=True"),
    ],
)
def test_export_refuses_what_the_native_router_cannot_compute(model_type, settings, message, tmp_path):
    dense_overrides = {k: settings.pop(k) for k in ("attention_bias",) if k in settings}
    tiny_dense(model_type, **dense_overrides).save_pretrained(tmp_path / "dense")
    moe = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", progress=False, **{**SETTINGS, **settings})
    refused(lambda: export_checkpoint(moe, tmp_path / "out", progress=False), message, tmp_path)


def test_upcycle_format_native_names_the_flags(save_dense, tmp_path):
    _, dense_folder = save_dense("qwen3")

    def call():
        settings = {**SETTINGS, "scoring_func": "softmax", "moe_layers": "every_other"}
        upcycle_checkpoint(dense_folder, tmp_path / "out", format="native", progress=False, **settings)

    refused(call, r"upcycle with --scoring-func sigmoid[\s\S]*upcycle with --moe-layers all or last_half", tmp_path)


@pytest.mark.parametrize(
    "model_type, overrides, message",
    [
        ("glm4_moe", dict(routed_scaling_factor=2.5), "hf_moe can only import glm4_moe with routed_scaling_factor=1.0"),
        ("glm4_moe", dict(partial_rotary_factor=0.5), "with rope_parameters partial_rotary_factor=1.0, got 0.5"),
        ("glm4_moe", dict(use_qk_norm=True), "hf_moe can only import glm4_moe with use_qk_norm=False, got True"),
        ("dots1", dict(n_group=2, topk_group=1), "hf_moe can only import dots1 with n_group=1, got 2"),
    ],
)
def test_import_refuses_native_routing_hf_moe_does_not_compute(model_type, overrides, message, tmp_path):
    save_native(model_type, tmp_path / "native", **overrides)
    refused(lambda: import_checkpoint(tmp_path / "native", tmp_path / "out", progress=False), message, tmp_path)


def test_a_native_checkpoint_without_its_biases_is_refused(tmp_path):
    save_native("dots1", tmp_path / "native")
    tensors = load_file(tmp_path / "native" / "model.safetensors")
    del tensors["model.layers.2.mlp.gate.e_score_correction_bias"]
    save_file(tensors, tmp_path / "native" / "model.safetensors", metadata={"format": "pt"})
    refused(
        lambda: import_checkpoint(tmp_path / "native", tmp_path / "out", progress=False),
        "missing tensors the dots1 config requires: model.layers.2.mlp.gate.e_score_correction_bias",
        tmp_path,
    )


def test_help_and_cards_name_the_mappings(save_dense, tmp_path):
    mappings = supported_mappings()
    assert "llama -> glm4_moe (--routing aux_free, scoring_func='sigmoid', moe_layers the last layers" in mappings
    assert "qwen3 -> dots1 (--routing aux_free, scoring_func='sigmoid', moe_layers the last layers" in mappings
    _, dense_folder = save_dense("llama")
    moe = upcycle_checkpoint(dense_folder, tmp_path / "moe", progress=False, **{**SETTINGS, "moe_layers": "all"})
    assert "can be exported exactly to the native `glm4_moe` architecture" in (moe / "README.md").read_text()
    card = (export_checkpoint(moe, tmp_path / "native", progress=False) / "README.md").read_text()
    assert "exported with `hf_moe` from the `aux_free_moe` checkpoint" in card
    assert "gates: sigmoid scores renormalised to sum 1" in card
    assert "router.expert_bias is written as gate.e_score_correction_bias" in card
    imported = import_checkpoint(tmp_path / "native", tmp_path / "back", progress=False)
    assert "(`aux_free_moe`), backbone `llama`" in (imported / "README.md").read_text()
