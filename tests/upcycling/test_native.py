"""Export to native transformers MoE architectures and import back: exact, streamed, atomic, refused with reasons."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB, leftovers, tiny_config, tiny_dense
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_moe  # noqa: F401  (registers the architectures)
from hf_moe import export_checkpoint, import_checkpoint, upcycle_checkpoint
from hf_moe.cli import main
from hf_moe.upcycling import VerificationError
from hf_moe.upcycling import export as export_module
from hf_moe.upcycling.native import FAMILIES, FAMILIES_BY_ROUTE, NO_NATIVE_COUNTERPART

MAX_ABS = 1e-5
# (dense backbone, upcycling settings) -> native model_type. Routers get a large init so that
# tokens pick different experts, and noisy experts so that a wrong expert or gate shows.
EXPORTS = {
    "qwen3-mixed-renormalised": ("qwen3", dict(moe_layers="every_other", norm_topk_prob=True), "qwen3_moe"),
    "qwen3-mixed-raw": ("qwen3", dict(moe_layers=[0, 2], norm_topk_prob=False), "qwen3_moe"),
    "llama-all": ("llama", dict(moe_layers="all"), "mixtral"),
    "mistral-all": ("mistral", dict(moe_layers="all"), "mixtral"),
    "qwen2-mixed-raw": ("qwen2", dict(moe_layers="every_other", norm_topk_prob=False), "qwen2_moe"),
    "olmo2-all-raw": ("olmo2", dict(moe_layers="all", norm_topk_prob=False), "flex_olmo"),
}
SETTINGS = dict(num_experts=4, num_experts_per_tok=2, expert_init="noise", noise_std=0.5, router_init_std=0.5)


def upcycle(dense_folder, output, **settings):
    return upcycle_checkpoint(dense_folder, output, progress=False, **{**SETTINGS, **settings})


def load(folder):
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    # Nothing missing but tensors without elements (qwen2_moe's empty shared expert), nothing unexpected.
    assert all(model.get_parameter(name).numel() == 0 for name in info.pop("missing_keys"))
    assert {k: v for k, v in info.items() if v} == {}
    return model.eval()


def assert_same_model(expected, actual):
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # left padding: hf_moe routes no padding token, so only real tokens are compared
    with torch.no_grad():
        for attention_mask in (None, mask):
            actual_logits = actual(input_ids, attention_mask=attention_mask).logits
            expected_logits = expected(input_ids, attention_mask=attention_mask).logits
            real = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool()
            assert (actual_logits - expected_logits)[real].abs().max().item() <= MAX_ABS
    prompt = input_ids[:1, :4]
    generated = actual.generate(prompt, max_new_tokens=8, do_sample=False)  # cached decoding
    assert torch.equal(generated, expected.generate(prompt, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_loads_natively_and_computes_the_same_function(case, save_dense, tmp_path):
    model_type, settings, native_type = EXPORTS[case]
    _, dense_folder = save_dense(model_type)
    (dense_folder / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    moe_folder = upcycle(dense_folder, tmp_path / "moe", **settings)
    native_folder = export_checkpoint(moe_folder, tmp_path / "native", progress=False)

    config = json.loads((native_folder / "config.json").read_text())
    assert config["model_type"] == native_type
    assert "auto_map" not in config and not list(native_folder.glob("*.py"))  # no remote code
    assert config["hf_moe_export"]["verification"]["tensors_bit_exact"] is True
    assert (native_folder / "tokenizer_config.json").read_text() == '{"chat_template": "{{ messages }}"}'
    assert (native_folder / "generation_config.json").is_file()
    native = load(native_folder)
    assert type(native).__module__.startswith(f"transformers.models.{native_type}.")
    moe = load(moe_folder)
    assert_same_model(moe, native)
    # The backbone's fields carry over unchanged.
    dense_config = moe.config.text_config.to_dict()
    for field in (
        "hidden_size",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_parameters",
        "head_dim",
        "sliding_window",
    ):
        if dense_config.get(field) is not None:
            assert getattr(native.config, field) == dense_config[field], field


def test_qwen3_moe_dense_layers_follow_moe_layers(save_dense, tmp_path):
    _, dense_folder = save_dense("qwen3")
    moe_folder = upcycle(dense_folder, tmp_path / "moe", moe_layers=[1])
    native = load(export_checkpoint(moe_folder, tmp_path / "native", progress=False))
    assert native.config.mlp_only_layers == [0, 2]
    assert [type(layer.mlp).__name__ for layer in native.model.layers] == [
        "Qwen3MoeMLP",
        "Qwen3MoeSparseMoeBlock",
        "Qwen3MoeMLP",
    ]


def test_upcycle_format_native_is_one_step_and_verified(save_dense, tmp_path):
    dense, dense_folder = save_dense("llama")
    output = upcycle_checkpoint(
        dense_folder, tmp_path / "mixtral", num_experts=4, num_experts_per_tok=2, moe_layers="all",
        format="native", verify=True, progress=False,
    )  # fmt: skip
    assert leftovers(tmp_path) == ["llama-single", "mixtral"]  # the intermediate hf_moe folder is gone
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert config["hf_moe_export"]["upcycling"]["verification"]["passed"] is True  # the upcycler's own check
    assert config["hf_moe_export"]["verification"]["passed"] is True
    assert_same_model(dense, load(output))  # copy init, renormalised top-k: the dense function


# Native MoE checkpoints as people have them: random weights from a tiny native config.
NATIVE_CONFIGS = {
    "qwen3_moe": dict(moe_intermediate_size=48, mlp_only_layers=[1], head_dim=8, norm_topk_prob=False),
    "mixtral": dict(sliding_window=None),
    "qwen2_moe": dict(moe_intermediate_size=48, shared_expert_intermediate_size=0),
    "flex_olmo": dict(norm_topk_prob=True),
}


def save_native(model_type: str, folder, **overrides):
    base = {k: v for k, v in tiny_config("llama").to_dict().items() if k in ("hidden_size", "num_hidden_layers")}
    fields = dict(
        base, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
        num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    fields["num_local_experts" if model_type == "mixtral" else "num_experts"] = 4
    config = AutoConfig.for_model(model_type, **{**fields, **NATIVE_CONFIGS[model_type], **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("model_type", list(NATIVE_CONFIGS))
def test_import_then_export_round_trip_is_bit_exact(model_type, tmp_path):
    native = save_native(model_type, tmp_path / "native")
    imported = import_checkpoint(tmp_path / "native", tmp_path / "hf_moe", progress=False)
    config = json.loads((imported / "config.json").read_text())
    assert config["model_type"] == "switch_moe" and config["capacity_factor"] is None
    moe = load(imported)
    assert_same_model(native, moe)

    exported = export_checkpoint(imported, tmp_path / "again", progress=False)
    original, again = load_file(tmp_path / "native" / "model.safetensors"), load_file(exported / "model.safetensors")
    # qwen2_moe's empty shared expert: its tensors without elements are not written (vLLM rejects them),
    # and its gate multiplies exactly 0: hf_moe drops it, export writes zeros.
    empty = {k for k, v in original.items() if v.numel() == 0}
    assert original.keys() - empty == again.keys()
    assert bool(empty) == (model_type == "qwen2_moe")
    gates = {k for k in original if k.endswith("shared_expert_gate.weight")}
    assert all(torch.equal(original[k], again[k]) for k in original.keys() - gates - empty)
    assert all(not again[k].any() for k in gates)
    assert json.loads((exported / "config.json").read_text())["model_type"] == model_type


def test_import_takes_sharded_checkpoints(tmp_path):
    native = save_native("qwen3_moe", tmp_path / "native", mlp_only_layers=[])
    native.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    imported = import_checkpoint(tmp_path / "sharded", tmp_path / "hf_moe", max_shard_size="40KB", progress=False)
    assert (imported / "model.safetensors.index.json").is_file()
    assert_same_model(native, load(imported))


def test_imported_all_moe_model_takes_the_experts_size(tmp_path):
    # Qwen3-30B-A3B style: every layer MoE, intermediate_size unused, experts smaller.
    native = save_native("qwen3_moe", tmp_path / "native", mlp_only_layers=[], intermediate_size=96)
    moe = load(import_checkpoint(tmp_path / "native", tmp_path / "hf_moe", progress=False))
    assert moe.config.text_config.intermediate_size == 48
    assert_same_model(native, moe)


# Refusals: each names the setting and what would make it work, and writes nothing.
def refused(call, match, tmp_path, output="out"):
    with pytest.raises(ValueError, match=match):
        call()
    assert not (tmp_path / output).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{output}")]


@pytest.mark.parametrize(
    "model_type, settings, message",
    [
        ("llama", dict(routing="expert_choice"), "Expert Choice routing has no native counterpart"),
        ("llama", dict(moe_layers="every_other"), r"mixtral needs every layer MoE, got moe_layers \[1\]: upcycle with"),
        ("mistral", dict(moe_layers="all", norm_topk_prob=False), r"mixtral renormalises top-k gates; this model uses"),
        ("mistral", dict(moe_layers="all", norm_topk_prob=False), r"raw gates \(norm_topk_prob=False\)"),
        ("qwen3", dict(eval_capacity_factor=1.0), "evaluation capacity factor 1.0 drops tokens; native models are"),
        ("olmo2", dict(moe_layers=[0]), "flex_olmo needs every layer MoE"),
        (
            "gemma3_text",
            dict(),
            "'gemma3_text' has no native MoE counterpart: transformers has no Gemma 3 MoE architecture",
        ),
        ("phi3", dict(), "phimoe routes with SparseMixer"),
        ("gpt2", dict(), "backbone 'gpt2' has no native MoE counterpart"),
        ("llama", dict(moe_layers="all", mlp_bias=True), "mixtral has no mlp_bias=True"),
    ],
)
def test_export_refuses_settings_without_native_counterpart(model_type, settings, message, tmp_path):
    dense_overrides = {k: settings.pop(k) for k in ("mlp_bias",) if k in settings}
    tiny_dense(model_type, **dense_overrides).save_pretrained(tmp_path / "dense")
    base = dict(num_experts=4) if settings.get("routing") == "expert_choice" else SETTINGS
    moe = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", progress=False, **{**base, **settings})
    refused(lambda: export_checkpoint(moe, tmp_path / "out", progress=False), message, tmp_path)


def test_upcycle_format_native_refuses_before_writing_with_flag_names(save_dense, tmp_path):
    _, dense_folder = save_dense("llama")

    def call():
        upcycle_checkpoint(dense_folder, tmp_path / "out", format="native", norm_topk_prob=False, progress=False)

    refused(call, r"upcycle with --moe-layers all[\s\S]*upcycle with --norm-topk-prob true", tmp_path)
    refused(
        lambda: upcycle_checkpoint(dense_folder, tmp_path / "out", format="gguf"), "format must be one of", tmp_path
    )


def test_import_keeps_experts_of_another_size_than_the_dense_layers(tmp_path):
    # Dense layers with the dense MLP, experts of moe_intermediate_size: hf_moe's field of the same name.
    native = save_native("qwen3_moe", tmp_path / "sizes", moe_intermediate_size=16)
    moe = load(import_checkpoint(tmp_path / "sizes", tmp_path / "hf_moe", progress=False))
    assert (moe.config.moe_intermediate_size, moe.config.text_config.intermediate_size) == (16, 48)
    assert_same_model(native, moe)


def test_wrong_kind_of_source_points_to_the_right_command(save_dense, tmp_path):
    _, dense_folder = save_dense("qwen3")
    refused(lambda: export_checkpoint(dense_folder, tmp_path / "out"), "hf-moe upcycle --format native", tmp_path)
    refused(lambda: import_checkpoint(dense_folder, tmp_path / "out"), "a dense checkpoint is upcycled", tmp_path)
    moe = upcycle(dense_folder, tmp_path / "moe")
    refused(lambda: import_checkpoint(moe, tmp_path / "out"), "`hf-moe export` writes it in a native format", tmp_path)
    save_native("mixtral", tmp_path / "mixtral")
    refused(
        lambda: export_checkpoint(tmp_path / "mixtral", tmp_path / "out"), "imported with `hf-moe import`", tmp_path
    )
    refused(
        lambda: upcycle_checkpoint(tmp_path / "mixtral", tmp_path / "out"),
        r"already a Mixture-of-Experts model \(model_type 'mixtral', num_local_experts=\d+\).*`hf-moe import",
        tmp_path,
    )


def test_import_reports_missing_and_unexpected_tensors(tmp_path):
    save_native("mixtral", tmp_path / "native")
    tensors = load_file(tmp_path / "native" / "model.safetensors")
    tensors["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = tensors.pop(
        "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    )
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "native" / "model.safetensors")
    refused(
        lambda: import_checkpoint(tmp_path / "native", tmp_path / "out"),
        r"missing tensors the mixtral config requires: model.layers.0.block_sparse_moe.experts.3.w1.weight[\s\S]*"
        r"unexpected tensors the mixtral config does not have: model.layers.0.block_sparse_moe.experts.4.w1.weight",
        tmp_path,
    )


def test_failed_verification_leaves_nothing(save_dense, tmp_path, monkeypatch):
    _, dense_folder = save_dense("qwen3")
    moe = upcycle(dense_folder, tmp_path / "moe")
    monkeypatch.setattr(export_module, "_compare_logits", lambda *args: 0.5)
    with pytest.raises(VerificationError, match=r"relative deviation 0.5 \(tolerance 1e-05"):
        export_checkpoint(moe, tmp_path / "out", progress=False)
    assert leftovers(tmp_path) == ["moe", "qwen3-single"]


def test_existing_output_is_kept_without_overwrite(save_dense, tmp_path):
    _, dense_folder = save_dense("qwen3")
    moe = upcycle(dense_folder, tmp_path / "moe")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_checkpoint(moe, tmp_path / "out", progress=False)
    export_checkpoint(moe, tmp_path / "out", progress=False, overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_every_dense_family_has_a_target_or_a_reason():
    from tiny_models import TINY_CONFIGS

    for model_type in TINY_CONFIGS:
        assert (("switch", model_type) in FAMILIES_BY_ROUTE) != (model_type in NO_NATIVE_COUNTERPART), model_type
    assert {f.model_type for f in FAMILIES} == {"qwen3_moe", "mixtral", "qwen2_moe", "flex_olmo", "glm4_moe", "dots1"}


def test_cards_say_how_to_serve_and_what_differs(save_dense, tmp_path):
    _, dense_folder = save_dense("qwen3")
    moe = upcycle(dense_folder, tmp_path / "moe", norm_topk_prob=False)
    upcycled_card = (moe / "README.md").read_text()
    assert "can be exported exactly to the native `qwen3_moe` architecture" in upcycled_card
    card = (export_checkpoint(moe, tmp_path / "native", progress=False) / "README.md").read_text()
    assert "**vLLM** (`Qwen3MoeForCausalLM`)" in card and "**llama.cpp** (`qwen3moe`)" in card
    assert "llama.cpp always renormalises qwen3moe top-k gates: this raw-gate model" in card
    assert "llama.cpp cannot load dense/MoE layer mixes: layers [0, 2] are dense" in card

    _, llama_folder = save_dense("llama")
    ec = upcycle_checkpoint(llama_folder, tmp_path / "ec", routing="expert_choice", num_experts=4, progress=False)
    assert (
        "cannot be exported to a native transformers architecture: Expert Choice routing"
        in (ec / "README.md").read_text()
    )
    mixtral_card = (upcycle(llama_folder, tmp_path / "all", moe_layers="all") / "README.md").read_text()
    assert "can be exported exactly to the native `mixtral` architecture" in mixtral_card


def test_cli_export_import_and_help(save_dense, tmp_path, capsys):
    _, dense_folder = save_dense("qwen3")
    moe = upcycle(dense_folder, tmp_path / "moe")
    assert main(["export", str(moe), str(tmp_path / "native"), "--no-progress"]) == 0
    assert "Verification (qwen3_moe): tensors bit-exact: True" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "native"), str(tmp_path / "back"), "--no-progress"]) == 0
    assert "(SwitchMoeForCausalLM)" in capsys.readouterr().out
    assert main(["export", str(dense_folder), str(tmp_path / "out")]) == 2
    assert "hf-moe: error: SOURCE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "qwen3 -> qwen3_moe (--routing switch, any moe_layers, either norm_topk_prob)" in help_text
    assert "llama/mistral -> mixtral (--routing switch, every layer MoE, renormalised top-k only)" in help_text
    assert "llama -> glm4_moe (--routing aux_free, scoring_func='sigmoid', moe_layers the last layers" in help_text


MEMORY_PROBE = """
import sys, threading, time
import psutil
from hf_moe import export_checkpoint, import_checkpoint
convert = export_checkpoint if sys.argv[1] == "export" else import_checkpoint
process = psutil.Process()
baseline = peak = process.memory_info().rss
done = threading.Event()
def sample():
    global peak
    while not done.is_set():
        peak = max(peak, process.memory_info().rss)
        time.sleep(0.0005)
sampler = threading.Thread(target=sample)
sampler.start()
convert(sys.argv[2], sys.argv[3], verify=False, progress=False)
done.set()
sampler.join()
print((peak - baseline) / 2**20)
"""


def test_export_and_import_stream_one_expert_at_a_time(tmp_path):
    # One MoE layer of 8 experts; each stacked expert weight is 8 x 4 MB = 32 MB, the model ~100 MB.
    dense = tiny_dense("llama", num_hidden_layers=1, hidden_size=128, intermediate_size=8192)
    dense.save_pretrained(tmp_path / "dense")
    moe = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", num_experts=8, moe_layers="all", progress=False)
    stacked_mb = 8 * 8192 * 128 * 4 / 2**20
    for command, source in (("export", moe), ("import", tmp_path / "native")):
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, command, str(source), str(tmp_path / command)],
            capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        if command == "export":
            os.rename(tmp_path / "export", tmp_path / "native")
        peak_growth_mb = float(result.stdout.split()[-1])
        assert peak_growth_mb < stacked_mb, (command, peak_growth_mb)  # holding the model would take ~3x that


def test_tied_embeddings_and_dtype_carry_over(tmp_path):
    tiny_dense("qwen3", tie_word_embeddings=True).to(torch.bfloat16).save_pretrained(tmp_path / "dense")
    moe = upcycle(tmp_path / "dense", tmp_path / "moe")
    native_folder = export_checkpoint(moe, tmp_path / "native", progress=False)
    assert "lm_head.weight" not in load_file(native_folder / "model.safetensors")
    native = load(native_folder)
    assert native.config.tie_word_embeddings and native.dtype == torch.bfloat16
    assert native.lm_head.weight.data_ptr() == native.model.embed_tokens.weight.data_ptr()
    assert_same_model(load(moe).float(), native.float())


@pytest.mark.parametrize(
    "model_type, auto_class, native_class",
    [
        ("qwen3", AutoModelForSequenceClassification, "Qwen3MoeForSequenceClassification"),
        ("llama", AutoModel, "MixtralModel"),
    ],
)
def test_other_heads_export_and_import(model_type, auto_class, native_class, tmp_path):
    torch.manual_seed(0)
    auto_class.from_config(tiny_config(model_type, num_labels=3)).save_pretrained(tmp_path / "dense")
    moe = upcycle(tmp_path / "dense", tmp_path / "moe", moe_layers="all")
    native_folder = export_checkpoint(moe, tmp_path / "native", progress=False)
    native = auto_class.from_pretrained(native_folder).eval()
    assert type(native).__name__ == native_class
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    key = "logits" if native_class.endswith("Classification") else "last_hidden_state"
    with torch.no_grad():
        expected = auto_class.from_pretrained(moe).eval()(input_ids)[key]
        assert (native(input_ids)[key] - expected).abs().max() <= MAX_ABS
    back = import_checkpoint(native_folder, tmp_path / "back", progress=False)
    assert json.loads((back / "config.json").read_text())["architectures"][0].startswith("SwitchMoe")
