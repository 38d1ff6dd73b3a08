"""Upcycling with a shared expert (``--shared-expert``): the step-0 function is the dense one on every backbone,
streamed and in memory, gated (Qwen2-MoE) or not; training reaches the shared and the routed experts; bad
options are named as the caller spells them; qwen2_moe export and import carry it exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_native import assert_same_model, load, save_native
from test_option_schema import flag_value, recipe_config
from tiny_models import TINY_CONFIGS, VOCAB, tiny_dense
from transformers import AutoModelForCausalLM

from hf_moe import export_checkpoint, import_checkpoint, upcycle_checkpoint, upcycle_model
from hf_moe.cli import main
from hf_moe.options import OptionsError
from hf_moe.upcycling.verify import relative_deviation

TOLERANCE = 1e-5
PART = 20  # a shared expert of 20 of the dense FFN's 48 neurons (GPT-2: of 128)
SHAPES = {"whole FFN": None, "split": PART}


def dense_logits(dense, input_ids):
    with torch.no_grad():
        return dense(input_ids).logits


def moe_logits(model, input_ids):
    with torch.no_grad():
        return model.eval()(input_ids).logits


INPUT_IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("size", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("gate", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("model_type", list(TINY_CONFIGS))
def test_upcycled_in_memory_computes_the_dense_function(model_type, gate, size):
    dense = tiny_dense(model_type)
    moe = upcycle_model(dense, num_experts=4, moe_layers="all", shared_expert=True, shared_expert_size=size,
                        shared_expert_gate=gate)  # fmt: skip
    block = moe.moe_blocks()[0]
    width = block.experts.get_submodule(_output_name(block)).in_features
    assert moe.config.shared_expert_intermediate_size == (size or width)
    assert (block.shared_expert_gate is not None) == gate
    assert relative_deviation(moe_logits(moe, INPUT_IDS), dense_logits(dense, INPUT_IDS)) <= TOLERANCE


def _output_name(block) -> str:
    return next(n for n, m in block.experts.named_modules() if getattr(m, "is_output_projection", False))


@pytest.mark.parametrize("gate", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("model_type", list(TINY_CONFIGS))
def test_streamed_checkpoint_verifies_and_equals_the_in_memory_conversion(model_type, gate, save_dense, tmp_path):
    dense, folder = save_dense(model_type)
    size = PART if gate else None  # one of each per backbone; both are exact in memory above
    settings = dict(num_experts=4, moe_layers="every_other", shared_expert=True, shared_expert_size=size,
                    shared_expert_gate=gate)  # fmt: skip
    output = upcycle_checkpoint(folder, tmp_path / "moe", verify=True, progress=False, **settings)
    report = json.loads((output / "config.json").read_text())["upcycling"]["verification"]
    assert report["function_preserving"] and report["passed"]
    assert report["model_max_relative_deviation"] <= TOLERANCE
    streamed = AutoModelForCausalLM.from_pretrained(output)
    assert relative_deviation(moe_logits(streamed, INPUT_IDS), dense_logits(dense, INPUT_IDS)) <= TOLERANCE
    in_memory = upcycle_model(dense, **settings).state_dict()
    written = load_file(output / "model.safetensors")
    assert any(".shared_expert." in name for name in written)
    assert all(torch.equal(written[name], in_memory[name]) for name in written)
    card = (output / "README.md").read_text()
    held = f"the dense MLP's first {PART} intermediate neurons" if size else "the whole dense MLP"
    assert f"an always-on shared expert (DeepSeekMoE, Dai et al. 2024; Qwen2-MoE) holds {held}" in card
    assert ("sigmoid(w.x) as in Qwen2-MoE" in card) == gate


INITS = {
    "noise": dict(expert_init="noise", noise_std=0.5),
    "drop": dict(expert_init="drop", drop_ratio=0.5),
    "expert choice": dict(routing="expert_choice"),
    "raw top-1": dict(num_experts_per_tok=1, norm_topk_prob=False),
    "capacity dropping": dict(eval_capacity_factor=0.5),
}


@pytest.mark.parametrize("settings", INITS.values(), ids=INITS.keys())
def test_whole_ffn_shared_expert_is_exact_with_any_routing_and_init(settings, save_dense, tmp_path):
    """The routed experts start with zero output projections: they add 0 whatever routes them and however
    their other weights were drawn, so verify holds these settings to the tolerance too."""
    dense, folder = save_dense("llama")
    output = upcycle_checkpoint(folder, tmp_path / "moe", num_experts=4, shared_expert=True, verify=True,
                                progress=False, **settings)  # fmt: skip
    report = json.loads((output / "config.json").read_text())["upcycling"]["verification"]
    assert report["function_preserving"] and report["passed"]
    model = AutoModelForCausalLM.from_pretrained(output)
    assert relative_deviation(moe_logits(model, INPUT_IDS), dense_logits(dense, INPUT_IDS)) <= TOLERANCE
    experts = model.moe_blocks()[0].experts
    if settings.get("expert_init") in ("noise", "drop"):  # the routed experts differ from each other
        up = experts.up_proj.weight
        assert not torch.equal(up[0], up[1])
    assert not experts.down_proj.weight.any()


def test_split_shared_expert_with_noise_is_measured_not_exact(save_dense, tmp_path):
    _, folder = save_dense("llama")
    output = upcycle_checkpoint(folder, tmp_path / "moe", shared_expert=True, shared_expert_size=PART,
                                expert_init="noise", noise_std=0.5, verify=True, progress=False)  # fmt: skip
    report = json.loads((output / "config.json").read_text())["upcycling"]["verification"]
    assert not report["function_preserving"] and report["model_max_relative_deviation"] > TOLERANCE


def changed(before: dict, model, part: str) -> set[str]:
    return {
        name
        for name, parameter in model.named_parameters()
        if f".mlp.{part}" in name and not torch.equal(before[name], parameter.detach())
    }


def train_step(model, optimizer):
    model.train()
    input_ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("gate", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("model_type", list(TINY_CONFIGS))
def test_training_reaches_the_shared_and_the_routed_experts(model_type, gate):
    # Split: every routed weight gets a gradient at the first step (the neurons past the shared slice are live).
    model = upcycle_model(tiny_dense(model_type), num_experts=4, shared_expert=True, shared_expert_size=PART,
                          shared_expert_gate=gate)  # fmt: skip
    names = {n for n, _ in model.named_parameters() if ".mlp." in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.1))
    shared = {n for n in names if ".shared_expert" in n}
    routed = {n for n in names if ".experts." in n or ".router." in n}
    assert shared and routed
    assert changed(before, model, "shared_expert") == shared
    assert changed(before, model, "experts.") | changed(before, model, "router.") == routed


def test_whole_ffn_routed_experts_learn_from_their_output_projection_first():
    """Zero output projections receive a gradient (the expert's hidden activation times the output gradient);
    the input projections and the router get theirs from the task loss once those have moved: one step later
    (the router terms are off here; they would move the router from the first step)."""
    model = upcycle_model(tiny_dense("llama"), num_experts=4, shared_expert=True, shared_expert_gate=True,
                          router_aux_loss_coef=0.0, router_z_loss_coef=0.0)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, optimizer)
    first = changed(before, model, "experts.") | changed(before, model, "router.")
    assert first and all(n.endswith("experts.down_proj.weight") for n in first)
    assert changed(before, model, "shared_expert_gate")
    train_step(model, optimizer)
    later = changed(before, model, "experts.") | changed(before, model, "router.")
    assert any("gate_proj" in n for n in later) and any("up_proj" in n for n in later)
    assert any(".router." in n for n in later)


ERRORS = [
    (
        {"shared_expert_size": 16},
        {
            "cli": "--shared-expert-size applies with --shared-expert only, got --shared-expert-size 16",
            "api": "shared_expert_size applies with shared_expert only, got shared_expert_size=16",
            "recipe": "upcycle.shared_expert_size applies with upcycle.shared_expert only, got "
            "upcycle.shared_expert_size=16",
        },
    ),
    (
        {"shared_expert_gate": True},
        {
            "cli": "--shared-expert-gate applies with --shared-expert only, got --shared-expert-gate",
            "api": "shared_expert_gate applies with shared_expert only, got shared_expert_gate=True",
            "recipe": "upcycle.shared_expert_gate applies with upcycle.shared_expert only",
        },
    ),
    (
        {"shared_expert": True, "shared_expert_size": 0},
        {
            "cli": "--shared-expert-size must be an integer >= 1 (unset: the whole FFN), got 0",
            "api": "shared_expert_size must be an integer >= 1 (unset: the whole FFN), got 0",
            "recipe": "upcycle.shared_expert_size must be an integer >= 1 (unset: the whole FFN), got 0",
        },
    ),
    (
        {"shared_expert": True, "shared_expert_size": 49},  # known once the dense config is read
        {
            "cli": "--shared-expert-size must be at most the dense FFN's intermediate size (48), got "
            "--shared-expert-size 49",
            "api": "shared_expert_size must be at most the dense FFN's intermediate size (48), got "
            "shared_expert_size=49",
        },
    ),
]


@pytest.mark.parametrize("options, messages", ERRORS, ids=[str(sorted(o.items())) for o, _ in ERRORS])
def test_bad_shared_expert_options_are_named_as_the_caller_spells_them(options, messages, save_dense, tmp_path,
                                                                       capsys):  # fmt: skip
    _, source = save_dense("llama")
    argv = ["upcycle", str(source), str(tmp_path / "moe"), "--no-progress"]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}"] + ([] if value is True else [flag_value(value)])
    assert main(argv) == 2
    assert f"hf-moe: error: Invalid upcycling settings:\n  - {messages['cli']}" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()

    with pytest.raises(OptionsError) as error:
        upcycle_model(tiny_dense("llama"), **options)
    assert messages["api"] in str(error.value)

    if "recipe" in messages:
        from hf_moe.training import MoeArguments

        config = recipe_config(options)
        for key in ("dataset_name", "output_dir"):
            del config[key]
        with pytest.raises(ValueError, match="Invalid MoeArguments") as error:
            MoeArguments(**config)
        assert messages["recipe"] in str(error.value)


# --- native qwen2_moe ------------------------------------------------------------------------------------------

NATIVE = {
    "ungated whole FFN": dict(moe_layers="all"),
    "gated split, dense layers": dict(moe_layers="every_other", shared_expert_gate=True, shared_expert_size=PART),
    "ungated split, raw gates": dict(moe_layers=[0, 2], shared_expert_size=PART, norm_topk_prob=False),
}


@pytest.mark.parametrize("settings", NATIVE.values(), ids=NATIVE.keys())
def test_qwen2_moe_export_and_import_carry_the_shared_expert_exactly(settings, save_dense, tmp_path):
    dense, folder = save_dense("qwen2")
    moe_dir = upcycle_checkpoint(folder, tmp_path / "moe", num_experts=4, shared_expert=True, expert_init="noise",
                                 noise_std=0.5, router_init_std=0.5, progress=False, **settings)  # fmt: skip
    moe = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    native_dir = export_checkpoint(moe_dir, tmp_path / "native", progress=False)
    config = json.loads((native_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe"
    assert config["shared_expert_intermediate_size"] == moe.config.shared_expert_intermediate_size
    assert config["hf_moe_export"]["verification"]["passed"]
    native = load(native_dir)  # nothing missing, nothing unexpected
    assert_same_model(moe, native)

    back_dir = import_checkpoint(native_dir, tmp_path / "back", progress=False)
    back = AutoModelForCausalLM.from_pretrained(back_dir).eval()
    assert back.config.shared_expert_gate  # qwen2_moe always gates its shared expert
    assert_same_model(moe, back)
    ours, again = load_file(moe_dir / "model.safetensors"), load_file(back_dir / "model.safetensors")
    gated = settings.get("shared_expert_gate", False)
    for name, tensor in ours.items():
        if not gated and name.endswith("shared_expert.down_proj.weight"):  # behind the zero gate: doubled
            assert torch.equal(again[name], 2 * tensor)
        else:
            assert torch.equal(again[name], tensor), name
    gates = {name for name in again if name.endswith("shared_expert_gate.weight")}
    assert gates and (gated or not any(again[name].any() for name in gates))


def test_native_qwen2_moe_with_a_shared_expert_imports_and_exports_bit_exact(tmp_path):
    native = save_native("qwen2_moe", tmp_path / "native", shared_expert_intermediate_size=16)
    imported = import_checkpoint(tmp_path / "native", tmp_path / "hf_moe", progress=False)
    config = json.loads((imported / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == 16 and config["shared_expert_gate"] is True
    assert_same_model(native, load(imported))
    exported = export_checkpoint(imported, tmp_path / "again", progress=False)
    original, again = load_file(tmp_path / "native" / "model.safetensors"), load_file(exported / "model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[name], again[name]) for name in original)


@pytest.mark.parametrize("model_type, family", [("qwen3", "qwen3_moe"), ("llama", "mixtral"), ("olmo2", "flex_olmo")])
def test_families_without_a_shared_expert_refuse_it(model_type, family, save_dense, tmp_path, capsys):
    _, folder = save_dense(model_type)
    moe_dir = upcycle_checkpoint(folder, tmp_path / "moe", moe_layers="all", shared_expert=True, progress=False)
    message = (
        f"{family} has no shared expert, this model has one (shared_expert_intermediate_size=48): "
        "upcycle with shared_expert=False; native families with a shared expert: ['qwen2_moe']"
    )
    with pytest.raises(ValueError) as error:
        export_checkpoint(moe_dir, tmp_path / "native", progress=False)
    assert message in str(error.value)
    assert not (tmp_path / "native").exists()
    argv = ["upcycle", str(folder), str(tmp_path / "native"), "--moe-layers", "all", "--shared-expert",
            "--format", "native", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    assert "upcycle without --shared-expert" in capsys.readouterr().err
    assert not (tmp_path / "native").exists()
