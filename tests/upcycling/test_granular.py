"""Fine-grained upcycling (``granularity`` G; He et al. 2024, arXiv 2410.07524): E * G experts, each a shard of
width I / G of the dense MLP, routed top-(k * G) with virtual groups, computing the dense function at step 0."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_native import assert_same_model, load
from test_option_schema import from_cli, from_recipe
from tiny_models import TINY_CONFIGS, VOCAB, tiny_dense
from transformers import AutoModelForCausalLM

from hf_moe import export_checkpoint, import_checkpoint, upcycle_checkpoint, upcycle_model
from hf_moe.cli import main
from hf_moe.modeling import SwitchMoeConfig, SwitchMoeForCausalLM
from hf_moe.options import OptionsError
from hf_moe.upcycling.verify import VerificationReport

TOLERANCE = 1e-5
INTERMEDIATE = {model_type: 48 for model_type in TINY_CONFIGS} | {"gpt2": 128}  # gpt2: 4 * n_embd
CASES = [(model_type, granularity) for model_type in TINY_CONFIGS for granularity in (2, 4)]


def relative_deviation(actual, expected) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def token_ids(seed: int = 0):
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type, granularity", CASES)
def test_copy_upcycling_computes_the_dense_function(model_type, granularity, save_dense, tmp_path):
    """Checkpoint streaming (with --verify) and in-memory conversion: exact at step 0, the same tensors."""
    dense, folder = save_dense(model_type)
    settings = dict(num_experts=3, num_experts_per_tok=2, granularity=granularity, router_init_std=0.5)
    output = upcycle_checkpoint(folder, tmp_path / "moe", verify=True, progress=False, **settings)

    config = json.loads((output / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"]) == (3 * granularity, 2 * granularity)
    assert config["moe_intermediate_size"] == INTERMEDIATE[model_type] // granularity
    assert config["upcycling"]["granularity"] == granularity
    report = VerificationReport.from_dict(config["upcycling"]["verification"])
    assert report.function_preserving and report.passed and report.model_deviation <= TOLERANCE

    streamed = AutoModelForCausalLM.from_pretrained(output).eval()
    input_ids = token_ids()
    assert relative_deviation(logits(streamed, input_ids), logits(dense, input_ids)) <= TOLERANCE
    in_memory = upcycle_model(dense, **settings)
    assert relative_deviation(logits(in_memory, input_ids), logits(dense, input_ids)) <= TOLERANCE
    written = load_file(output / "model.safetensors")
    assert all(torch.equal(tensor, written[name]) for name, tensor in in_memory.state_dict().items() if name in written)


def test_experts_are_shards_with_the_output_projection_scaled_and_routers_tied():
    """Expert e * G + g is shard g of the dense MLP: rows g of the input projections (phi3's fused gate/up
    projection by neuron, GPT-2's Conv1D columns), columns g of the output projection times G; its output
    bias is not scaled; the G router rows of a group are one draw."""
    for model_type, projections in (("phi3", ("gate_up_proj", "down_proj")), ("gpt2", ("c_fc", "c_proj"))):
        dense = tiny_dense(model_type, mlp_bias=True) if model_type != "gpt2" else tiny_dense(model_type)
        granularity, width = 4, INTERMEDIATE[model_type] // 4
        moe = upcycle_model(dense, num_experts=2, granularity=granularity, moe_layers=[1])
        dense_mlp = dense.get_decoder().layers[1].mlp if model_type == "phi3" else dense.transformer.h[1].mlp
        block = moe.backbone.base_model.layers[1].mlp if model_type == "phi3" else moe.backbone.transformer.h[1].mlp
        router = block.router.weight  # (E * G, hidden)
        assert torch.equal(router, router[::granularity].repeat_interleave(granularity, dim=0))
        assert not torch.equal(router[0], router[granularity])
        fused, output = (getattr(dense_mlp, p) for p in projections)
        experts_in, experts_out = (getattr(block.experts, p) for p in projections)
        for expert in range(2 * granularity):
            g = expert % granularity
            neurons = slice(g * width, (g + 1) * width)
            if model_type == "phi3":  # nn.Linear [out, in]; rows [0, I) gate, [I, 2I) up
                intermediate = INTERMEDIATE[model_type]
                rows = torch.cat([fused.weight[neurons], fused.weight[intermediate:][neurons]])
                assert torch.equal(experts_in.weight[expert], rows)
                assert torch.equal(experts_out.weight[expert], output.weight[:, neurons] * granularity)
            else:  # Conv1D [in, out]
                assert torch.equal(experts_in.weight[expert], fused.weight[:, neurons])
                assert torch.equal(experts_in.bias[expert], fused.bias[neurons])
                assert torch.equal(experts_out.weight[expert], output.weight[neurons] * granularity)
                assert torch.equal(experts_out.bias[expert], output.bias)
        assert experts_in.weight.shape[0] == experts_out.weight.shape[0] == 2 * granularity


@pytest.mark.parametrize("expert_init", ["copy", "noise", "drop"])
def test_tied_router_logits_select_whole_groups(expert_init):
    """Group members' logits are bit-identical (one router row each, the same matmul), and top-(k * G) over
    them takes every member of k groups, also when the experts differ (noise, drop) and the group count is odd."""
    dense = tiny_dense("llama")
    for granularity in (2, 3, 4):
        moe = upcycle_model(dense, num_experts=5, granularity=granularity, moe_layers="all", expert_init=expert_init)
        with torch.no_grad():
            output = moe.eval()(torch.randint(3, VOCAB, (3, 17)), output_router_logits=True)
        for router_logits in output.router_logits:  # (tokens, E * G)
            groups = router_logits.view(router_logits.shape[0], -1, granularity)
            assert torch.equal(groups, groups[..., :1].expand_as(groups))
            picked = router_logits.softmax(-1).topk(2 * granularity, dim=-1).indices // granularity
            members = torch.zeros(groups.shape[:2]).scatter_add_(1, picked, torch.ones(picked.shape))
            assert set(members.unique().tolist()) == {0.0, float(granularity)}


def test_noise_and_drop_change_the_function_and_verify_measures_it(save_dense, tmp_path):
    dense, folder = save_dense("qwen3")
    input_ids = token_ids()
    for expert_init, extra in (("noise", dict(noise_std=0.5)), ("drop", dict(drop_ratio=0.5))):
        settings = dict(num_experts=2, granularity=2, expert_init=expert_init, **extra)
        output = upcycle_checkpoint(folder, tmp_path / expert_init, verify=True, progress=False, **settings)
        report = json.loads((output / "config.json").read_text())["upcycling"]["verification"]
        assert report["function_preserving"] is False and report["passed"] is True
        assert report["model_max_relative_deviation"] > 1e-3
        card = (output / "README.md").read_text()
        assert "fine-grained upcycling (He et al. 2024, arXiv 2410.07524) with granularity 2" in card
        assert "| experts per MoE layer | 4 of width 24 (2 virtual groups x 2 shards) |" in card
        moe = AutoModelForCausalLM.from_pretrained(output)
        assert relative_deviation(logits(moe, input_ids), logits(dense, input_ids)) > 1e-3
        experts = moe.backbone.model.layers[1].mlp.experts.down_proj.weight  # (4, hidden, I / 2)
        assert not torch.equal(experts[0], experts[2])  # the same shard of two groups differs per expert
        assert torch.equal(
            upcycle_model(dense, **settings).state_dict()["backbone.model.layers.1.mlp.experts.down_proj.weight"],
            experts,
        )


def test_raw_gates_compute_what_coarse_upcycling_computes():
    """With norm_topk_prob=False the granular model equals the G = 1 model with the same router draw: the
    softmax over E * G tied logits is p_e / G per member, times the factor G on the output projection."""
    dense = tiny_dense("llama")
    input_ids = token_ids()
    coarse = upcycle_model(dense, num_experts=4, norm_topk_prob=False, router_init_std=0.5, moe_layers="all")
    fine = upcycle_model(
        dense, num_experts=4, granularity=4, norm_topk_prob=False, router_init_std=0.5, moe_layers="all"
    )
    expected, actual = logits(coarse.eval(), input_ids), logits(fine.eval(), input_ids)
    assert relative_deviation(actual, expected) <= TOLERANCE
    assert relative_deviation(actual, logits(dense, input_ids)) > 1e-3  # raw gates are not the dense function


def test_top_1_means_top_g_and_its_routers_learn():
    """k = 1 with G = 2 routes to one group (2 experts) whose renormalised gates (1/2 each) still pass the
    routers a task-loss gradient, unlike renormalised top-1 (a gate always 1), so it does not warn."""
    import warnings

    dense = tiny_dense("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moe = upcycle_model(dense, num_experts=4, num_experts_per_tok=1, granularity=2, moe_layers="all")
    assert moe.config.num_experts_per_tok == 2
    input_ids = token_ids()
    assert relative_deviation(logits(moe.eval(), input_ids), logits(dense, input_ids)) <= TOLERANCE
    moe.train()
    moe(input_ids, labels=input_ids).loss.backward()
    assert all(block.router.weight.grad.abs().max() > 0 for block in moe.moe_blocks())


def test_granular_model_saves_loads_and_keeps_the_expert_width(tmp_path):
    dense = tiny_dense("qwen3")
    moe = upcycle_model(dense, num_experts=2, granularity=2)
    moe.save_pretrained(tmp_path / "moe")
    loaded = SwitchMoeForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert loaded.config.moe_intermediate_size == 24
    input_ids = token_ids()
    assert torch.equal(logits(loaded, input_ids), logits(moe.eval(), input_ids))
    # A config that says otherwise names the mismatch instead of loading random experts.
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    (tmp_path / "moe" / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": None}))
    with pytest.raises(ValueError, match=r"experts\.down_proj\.weight is \[4, 32, 24\] in the checkpoint"):
        SwitchMoeForCausalLM.from_pretrained(tmp_path / "moe")


def test_moe_intermediate_size_is_validated():
    text = tiny_dense("llama").config
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=rf"moe_intermediate_size must be an integer >= 1 or None .*got {bad!r}"):
            SwitchMoeConfig(text_config=text, moe_intermediate_size=bad)
    model = SwitchMoeForCausalLM(SwitchMoeConfig(text_config=text, num_experts=4, moe_intermediate_size=16))
    assert model.moe_blocks()[0].experts.gate_proj.weight.shape == (4, 16, 32)
    assert model.moe_blocks()[0].experts.down_proj.weight.shape == (4, 32, 16)


def test_the_option_reads_the_same_in_cli_api_and_recipe(tmp_path):
    options = {"num_experts": 4, "num_experts_per_tok": 1, "granularity": 4}
    settings = from_cli(options)
    assert settings == from_recipe(options, tmp_path) and settings.granularity == 4
    config = settings.build_config(tiny_dense("gpt2").config)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (16, 4, 32)


@pytest.mark.parametrize(
    "options, cli, api",
    [
        (
            {"granularity": 5},
            "--granularity must divide the dense MLP's intermediate size (48 for this llama "
            "model), got --granularity 5",
            "granularity must divide the dense MLP's intermediate size (48 for this llama model), got granularity=5",
        ),
        (
            {"granularity": 0},
            "--granularity must be an integer >= 1, got 0",
            "granularity must be an integer >= 1, got 0",
        ),
        (
            {"routing": "expert_choice", "granularity": 2},
            "--granularity needs top-k token choice (virtual groups select whole groups of shards), which "
            "--routing expert_choice does not route by; use --routing switch, got --granularity 2",
            "which routing='expert_choice' does not route by; use routing='switch', got granularity=2",
        ),
    ],
)
def test_a_bad_granularity_is_named_as_the_caller_spells_it(options, cli, api, save_dense, tmp_path, capsys):
    _, source = save_dense("llama")
    argv = ["upcycle", str(source), str(tmp_path / "moe"), "--no-progress"]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    assert main(argv) == 2
    assert cli in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()
    with pytest.raises(OptionsError) as error:
        upcycle_model(tiny_dense("llama"), **options)
    assert api in str(error.value)


# --- native export and import --------------------------------------------------------------------------------

NATIVE = {
    "qwen3-mixed": ("qwen3", dict(moe_layers="every_other"), "qwen3_moe"),
    "qwen3-all": ("qwen3", dict(moe_layers="all"), "qwen3_moe"),
    "llama-all": ("llama", dict(moe_layers="all"), "mixtral"),
    "qwen2-mixed": ("qwen2", dict(moe_layers="every_other"), "qwen2_moe"),
    "olmo2-all": ("olmo2", dict(moe_layers="all"), "flex_olmo"),
}
EXPERT_SIZE_FIELD = {"qwen3_moe": "moe_intermediate_size", "qwen2_moe": "moe_intermediate_size"}


@pytest.mark.parametrize("case", list(NATIVE))
def test_export_is_exact_and_imports_back(case, save_dense, tmp_path):
    model_type, layers, native_type = NATIVE[case]
    dense, folder = save_dense(model_type)
    settings = dict(num_experts=2, granularity=2, expert_init="noise", noise_std=0.5, router_init_std=0.5, **layers)
    moe_folder = upcycle_checkpoint(folder, tmp_path / "moe", progress=False, **settings)
    native_folder = export_checkpoint(moe_folder, tmp_path / "native", progress=False)

    config = json.loads((native_folder / "config.json").read_text())
    assert config["model_type"] == native_type
    assert config["hf_moe_export"]["verification"]["tensors_bit_exact"] is True
    assert config["hf_moe_export"]["verification"]["model_max_relative_deviation"] <= TOLERANCE
    assert config.get("num_experts", config.get("num_local_experts")) == 4 and config["num_experts_per_tok"] == 4
    assert config.get("norm_topk_prob", True) is True
    assert config[EXPERT_SIZE_FIELD.get(native_type, "intermediate_size")] == 24
    if native_type in EXPERT_SIZE_FIELD:
        assert config["intermediate_size"] == 48  # the dense layers keep the dense MLP
    moe, native = load(moe_folder), load(native_folder)
    assert_same_model(moe, native)

    imported = import_checkpoint(native_folder, tmp_path / "back", progress=False)
    back = load(imported)
    assert_same_model(moe, back)
    original, again = load_file(moe_folder / "model.safetensors"), load_file(imported / "model.safetensors")
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    back_config = json.loads((imported / "config.json").read_text())
    assert (back_config["num_experts"], back_config["num_experts_per_tok"]) == (4, 4)
    assert back_config["moe_layers"] == json.loads((moe_folder / "config.json").read_text())["moe_layers"]


@pytest.mark.parametrize(
    "model_type, layers, message",
    [
        ("llama", "every_other", r"mixtral needs every layer MoE, got moe_layers \[1\]"),
        ("phi3", "all", "phimoe routes with SparseMixer"),
        ("gemma3_text", "all", "'gemma3_text' has no native MoE counterpart"),
        ("gpt2", "all", "backbone 'gpt2' has no native MoE counterpart"),
    ],
)
def test_export_refuses_what_the_family_cannot_express(model_type, layers, message, save_dense, tmp_path):
    _, folder = save_dense(model_type)
    moe = upcycle_checkpoint(folder, tmp_path / "moe", num_experts=2, granularity=2, moe_layers=layers, progress=False)
    with pytest.raises(ValueError, match=message):
        export_checkpoint(moe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_upcycle_format_native_writes_a_granular_qwen3_moe(save_dense, tmp_path):
    dense, folder = save_dense("qwen3")
    output = upcycle_checkpoint(folder, tmp_path / "out", format="native", num_experts=2, granularity=4, progress=False)
    config = json.loads((output / "config.json").read_text())
    experts = config.get("num_experts", config.get("num_local_experts"))  # transformers 5 saves num_local_experts
    assert (experts, config["num_experts_per_tok"], config["moe_intermediate_size"]) == (8, 8, 12)
    assert config["hf_moe_export"]["upcycling"]["granularity"] == 4
    native = load(output)
    input_ids = token_ids()
    assert relative_deviation(logits(native, input_ids), logits(dense, input_ids)) <= TOLERANCE


def test_granular_checkpoint_loads_as_remote_code_without_hf_moe(save_dense, tmp_path):
    import subprocess
    import sys

    from test_upcycled_remote_code import LOAD_WITHOUT_HF_MOE

    dense, folder = save_dense("llama")
    output = upcycle_checkpoint(folder, tmp_path / "moe", num_experts=2, granularity=4, progress=False)
    input_ids = token_ids()
    torch.save(input_ids, tmp_path / "ids.pt")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-c", LOAD_WITHOUT_HF_MOE, str(output), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert relative_deviation(torch.load(tmp_path / "o.pt"), logits(dense, input_ids)) <= TOLERANCE


def test_plan_counts_the_same_parameters_as_coarse_upcycling():
    """E * G experts of width I / G hold the parameters of E dense copies, and top-(k * G) of them are as many
    active parameters as top-k copies; only the router grows (E * G rows)."""
    from hf_moe.upcycling import plan_upcycling

    config = tiny_dense("qwen3").config
    coarse = plan_upcycling(config, num_experts=4, moe_layers="all")
    fine = plan_upcycling(config, num_experts=4, granularity=4, moe_layers="all")
    routers = 3 * (16 - 4) * config.hidden_size  # 3 layers, 12 more rows each
    assert fine.expert_parameters == coarse.expert_parameters
    assert fine.total_parameters - coarse.total_parameters == routers
    assert fine.active_parameters - coarse.active_parameters == routers


def test_plan_counts_every_shard_for_expert_parallelism():
    from hf_moe.upcycling import plan_upcycling

    config = tiny_dense("qwen3").config
    plan = plan_upcycling(config, num_experts=3, granularity=2, moe_layers="all", ep_size=2, fsdp_size=2)
    assert plan.training.ep_size == 2  # 6 experts split over 2 ranks, though 3 groups would not split
    with pytest.raises(OptionsError, match=r"ep_size must divide the num_experts x granularity experts .*got "):
        plan_upcycling(config, num_experts=3, granularity=2, moe_layers="all", ep_size=4, fsdp_size=4)
