"""Expert parallelism and FSDP2 through transformers' DistributedConfig, on CPU with gloo.

Each test launches ``torchrun`` (2 or 4 processes) on tiny checkpoints written here, and compares
every rank's numbers with one process running the same rows, computed in this test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from ep_tasks import data_slice, forward_results, labels_of
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import hf_moe

WORKER = Path(__file__).with_name("worker.py")
VOCAB = 96
EXPERTS = 4
LOGITS_TOLERANCE = 1e-5  # the bound for logits; fp32 round-off is ~1e-7 here
ROUTING_TOLERANCE = 1e-6


def text_config(model_type: str = "llama"):
    if model_type == "gpt2":
        sizes = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
    else:
        sizes = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    return AutoConfig.for_model(model_type, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **sizes)


def save_model(config, path: Path, learn_thresholds: bool = False) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if learn_thresholds:  # Expert-Choice thresholds learned from a few training forwards (not 0)
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=torch.randint(3, VOCAB, (4, 12)))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    switch = hf_moe.SwitchMoeConfig
    expert_choice = hf_moe.ExpertChoiceMoeConfig
    return {  # of 2 layers each, 4 experts
        # Switch: top-1, training capacity 1.25 (drops), dropless evaluation
        "switch": save_model(switch(text_config=text_config(), num_experts=EXPERTS, moe_layers="all"), root / "switch"),
        # top-2 renormalised, capacity in evaluation too, one MoE layer of two
        "top2_capacity": save_model(
            switch(
                text_config=text_config(),
                num_experts=EXPERTS,
                moe_layers=[1],
                num_experts_per_tok=2,
                norm_topk_prob=True,
                capacity_factor=1.0,
                eval_capacity_factor=0.75,
            ),
            root / "top2_capacity",
        ),
        # GPT-2: Conv1D weights kept as (E, in, out), and biases
        "gpt2": save_model(
            switch(text_config=text_config("gpt2"), num_experts=EXPERTS, moe_layers="all"), root / "gpt2"
        ),
        "expert_choice": save_model(
            expert_choice(text_config=text_config(), num_experts=EXPERTS, moe_layers="all"),
            root / "expert_choice",
            learn_thresholds=True,
        ),
        "expert_choice_fresh": save_model(
            expert_choice(text_config=text_config(), num_experts=EXPERTS, moe_layers="all"),
            root / "expert_choice_fresh",
        ),
    }


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict[str, torch.Tensor]:
    """4 sequences of 12 tokens; two of them left-padded (padding takes no capacity, gets no loss)."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (4, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    attention_mask[3, :5] = 0
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask}


def launch(tmp_path: Path, processes: int, tasks: list[dict], batch: dict, gpus: bool = False) -> list[dict]:
    """Run the tasks under ``torchrun --nproc_per_node processes``; each rank's results.

    The processes use the CPU (gloo) unless ``gpus``: transformers takes any visible GPU.
    """
    torch.save(batch, tmp_path / "inputs.pt")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"inputs": str(tmp_path / "inputs.pt"), "out": str(tmp_path), "tasks": tasks}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    result = subprocess.run(
        [*command, str(WORKER), str(spec)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(processes)]


def rows_of_rank(rank: int, distributed: dict) -> tuple[int, int]:
    """(data-parallel size, data rank) of a rank in a DistributedConfig layout (tp inner)."""
    return distributed.get("fsdp_size", 1), rank // distributed.get("tp_size", 1)


def assert_same(got: dict, want: dict, name: str) -> None:
    for field, expected in want.items():
        actual = got[f"{name}/{field}"]
        if field == "generated":
            assert torch.equal(actual, expected), f"{name}: greedy tokens differ\n{actual}\n{expected}"
            continue
        tolerance = LOGITS_TOLERANCE if field == "logits" else ROUTING_TOLERANCE
        difference = (actual - expected).abs().max().item()
        assert difference <= tolerance, f"{name}/{field}: max abs difference {difference:.3g} > {tolerance}"


EP2_FSDP2 = {"ep_size": 2, "fsdp_size": 2}  # all-to-all: each rank its own rows
EP2_TP2 = {"ep_size": 2, "tp_size": 2}  # the ranks share the rows: all-reduce at inference, attention split too
# Every rank runs its own experts on all rows and the outputs are summed. transformers accepts
# tp_plan={} (the dense weights whole, no TP rules) from 5.25 on; earlier releases refuse an empty
# plan under tp_size=2, so there the attention is split by TP as well.
EP2_ALL_REDUCE = {"ep_size": 2, "tp_size": 2, "ep_implementation": "all_reduce"}
if Version(transformers.__version__) >= Version("5.25"):
    EP2_ALL_REDUCE["tp_plan"] = {}
EXPERT_CHOICE_ROUTING = {"inference_routing": "expert_choice"}
FORWARD_TASKS = [
    {"name": "switch", "checkpoint": "switch", "distributed": EP2_FSDP2, "generate": 5},
    {"name": "switch_tp", "checkpoint": "switch", "distributed": EP2_TP2, "generate": 5},
    {"name": "top2_capacity", "checkpoint": "top2_capacity", "distributed": EP2_FSDP2},
    {"name": "gpt2", "checkpoint": "gpt2", "distributed": EP2_FSDP2, "generate": 5},
    {"name": "expert_choice_threshold", "checkpoint": "expert_choice", "distributed": EP2_FSDP2, "generate": 5},
    {"name": "expert_choice", "checkpoint": "expert_choice", "distributed": EP2_FSDP2, "load": EXPERT_CHOICE_ROUTING},
    {
        "name": "expert_choice_all_reduce",
        "checkpoint": "expert_choice",
        "distributed": EP2_ALL_REDUCE,
        "load": EXPERT_CHOICE_ROUTING,
    },
]


def forward_tasks(tasks: list[dict], checkpoints: dict) -> list[dict]:
    return [{**task, "mode": "forward", "checkpoint": str(checkpoints[task["checkpoint"]])} for task in tasks]


def one_process_forward(checkpoint: Path, task: dict, batch: dict, rank: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **task.get("load", {}))
    return forward_results(model, data_slice(batch, *rows_of_rank(rank, task["distributed"])), task.get("generate", 0))


@pytest.fixture(scope="module")
def forward_run(checkpoints, batch, tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("forward"), 2, forward_tasks(FORWARD_TASKS, checkpoints), batch)


@pytest.mark.parametrize("task", FORWARD_TASKS, ids=[task["name"] for task in FORWARD_TASKS])
def test_forward_and_generation_equal_one_process(forward_run, checkpoints, batch, task):
    """Logits, loss, aux/z losses, expert load, dropped fraction and greedy tokens of each rank equal
    those of one process on that rank's rows (all rows for the layouts whose ranks share them)."""
    for rank, results in enumerate(forward_run):
        reference = one_process_forward(checkpoints[task["checkpoint"]], task, batch, rank)
        # every MoE layer sends rows to the experts of both ranks: tokens do cross between ranks
        load = reference["expert_load"].view(-1, 2, EXPERTS // 2).sum(-1)  # (layers, ranks)
        assert (load > 0).all()
        assert_same(results, reference, task["name"])
    if task["checkpoint"] == "top2_capacity":
        assert (reference["dropped_fraction"] > 0).all()  # evaluation capacity does drop tokens here


def test_each_rank_holds_its_share_of_the_experts(forward_run):
    for results in forward_run:
        for task in ("switch", "gpt2", "expert_choice_all_reduce"):
            assert results[f"{task}/experts_per_rank"].tolist() == [EXPERTS // 2] * 2
            assert results[f"{task}/expert_weight_rows"].tolist() == [EXPERTS // 2] * 2


def test_the_ep_plan_names_the_experts_and_their_weights_of_every_moe_block(checkpoints):
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoints["gpt2"]))
    assert {name: style for name, style in model.ep_plan.items() if ".experts" in name} == {
        "backbone.transformer.h.*.mlp.experts": "ep_dispatch_experts",
        **{
            f"backbone.transformer.h.*.mlp.experts.{name}": "grouped_gemm"
            for name in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")
        },
    }


def test_an_expert_count_that_the_ranks_cannot_share_is_refused():
    config = hf_moe.SwitchMoeConfig(text_config=text_config(), num_experts=3, moe_layers="all")
    config.distributed_config = DistributedConfig(ep_size=2, fsdp_size=2)
    with pytest.raises(ValueError, match=r"DistributedConfig ep_size must divide num_experts \(3\) .*got ep_size=2"):
        AutoModelForCausalLM.from_config(config)


LR = 1.0  # one SGD step: the parameters move by the gradient itself
TRAIN_TASKS = [
    # Switch: top-1 with training capacity (drops), load-balancing and z losses
    {"name": "train_switch", "checkpoint": "switch", "distributed": EP2_FSDP2},
    # Expert Choice: its score thresholds are learned from the batch of every rank
    {"name": "train_expert_choice", "checkpoint": "expert_choice_fresh", "distributed": EP2_FSDP2},
    # every rank holds all rows and runs its own experts on them
    {"name": "train_switch_all_reduce", "checkpoint": "switch", "distributed": EP2_ALL_REDUCE},
]


@pytest.fixture(scope="module")
def train_batch(batch) -> dict[str, torch.Tensor]:
    """No padding: every rank has as many labels as the others, so one process's mean over the
    whole batch is the mean of the ranks' means."""
    return {"input_ids": batch["input_ids"].clamp(min=3), "attention_mask": torch.ones_like(batch["attention_mask"])}


def one_process_step(checkpoint: Path, batch: dict, distributed: dict, micro_batches: bool) -> tuple:
    """The trained weights and each data rank's loss of one SGD step on the whole batch in one process.

    The load-balancing loss is not linear in the batch: formed on each rank's rows (as FSDP does),
    the step is that of the mean of the ranks' losses (``micro_batches``). Expert Choice takes the
    whole batch in one forward: its thresholds are learned from all sequences at once.
    """
    model = AutoModelForCausalLM.from_pretrained(checkpoint).train()
    data_parallel_size = distributed.get("fsdp_size", 1)
    slices = [data_slice(batch, data_parallel_size, rank) for rank in range(data_parallel_size)]
    if micro_batches:
        outputs = [model(**rows, labels=labels_of(rows)) for rows in slices]
        loss = sum(output.loss for output in outputs) / data_parallel_size
    else:
        loss = model(**batch, labels=labels_of(batch)).loss
        fresh = AutoModelForCausalLM.from_pretrained(checkpoint).train()  # each rank's own loss, before the step
        with torch.no_grad():
            outputs = [fresh(**rows, labels=labels_of(rows)) for rows in slices]
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return model.state_dict(), [output.loss.detach() for output in outputs]


@pytest.fixture(scope="module")
def train_run(checkpoints, train_batch, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("train")
    tasks = [
        {**task, "mode": "train", "lr": LR, "checkpoint": str(checkpoints[task["checkpoint"]])} for task in TRAIN_TASKS
    ]
    return out, launch(out, 2, tasks, train_batch)


@pytest.mark.parametrize("task", TRAIN_TASKS, ids=[task["name"] for task in TRAIN_TASKS])
def test_a_training_step_equals_one_process_and_its_checkpoint_loads_in_one_process(
    train_run, checkpoints, train_batch, task
):
    out, results = train_run
    before = AutoModelForCausalLM.from_pretrained(checkpoints[task["checkpoint"]]).state_dict()
    expected, losses = one_process_step(
        checkpoints[task["checkpoint"]], train_batch, task["distributed"], "switch" in task["checkpoint"]
    )
    trained = AutoModelForCausalLM.from_pretrained(out / task["name"])  # saved by the sharded run
    got = trained.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        difference = (got[name].float() - tensor.float()).abs().max().item()
        assert difference <= ROUTING_TOLERANCE, f"{task['name']}: {name} differs by {difference:.3g}"
    moved = [name for name in expected if (expected[name].float() - before[name].float()).abs().max() > 1e-4]
    assert any(".experts." in name for name in moved) and any(".router." in name for name in moved)
    if task["checkpoint"] == "expert_choice_fresh":
        assert any("score_thresholds" in name for name in moved)  # learned in this step, equal on every rank
    for rank, rank_results in enumerate(results):
        _, data_rank = rows_of_rank(rank, task["distributed"])
        expected_loss = losses[data_rank] if len(losses) > 1 else losses[0]
        assert abs(rank_results[f"{task['name']}/loss"].item() - expected_loss.item()) <= ROUTING_TOLERANCE


FOUR_RANK_TASKS = [
    # each expert on two ranks, FSDP-sharded between them (efsdp = fsdp * tp / ep = 2)
    {
        "name": "train_switch_efsdp",
        "checkpoint": "switch",
        "distributed": {"ep_size": 2, "fsdp_size": 4},
        "mode": "train",
    },
    # one expert per rank
    {"name": "switch_ep4", "checkpoint": "switch", "distributed": {"ep_size": 4, "fsdp_size": 4}, "mode": "forward"},
]


def test_four_ranks_train_and_forward_as_one_process(checkpoints, batch, train_batch, tmp_path):
    tasks = [{**task, "lr": LR, "checkpoint": str(checkpoints[task["checkpoint"]])} for task in FOUR_RANK_TASKS]
    results = launch(tmp_path, 4, tasks, train_batch)
    train, forward = FOUR_RANK_TASKS
    expected, losses = one_process_step(checkpoints["switch"], train_batch, train["distributed"], micro_batches=True)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / train["name"]).state_dict()
    for name, tensor in expected.items():
        difference = (got[name] - tensor).abs().max().item()
        assert difference <= ROUTING_TOLERANCE, f"{train['name']}: {name} differs by {difference:.3g}"
    for rank, rank_results in enumerate(results):
        assert abs(rank_results[f"{train['name']}/loss"] - losses[rank]).item() <= ROUTING_TOLERANCE
        assert rank_results[f"{forward['name']}/experts_per_rank"].tolist() == [1, 1]
        reference = one_process_forward(checkpoints["switch"], forward, train_batch, rank)
        assert_same(rank_results, reference, forward["name"])


GPU_TOLERANCE = 1e-4  # CUDA kernels against the CPU in float32


def test_on_gpus(request, checkpoints, batch, train_batch, tmp_path):
    """The GPU check (benchmarks/gpu_check.sh): ``ep_size=2, fsdp_size=2`` over NCCL with two GPUs or
    more; with one, the same tasks in one process (ep_size=1) as a sanity run of the GPU kernels."""
    if request.config.getoption("--device") != "cuda" or not torch.cuda.is_available():
        pytest.skip("GPU check: run with --device cuda on a machine with a GPU (benchmarks/gpu_check.sh)")
    processes = 2 if torch.cuda.device_count() >= 2 else 1
    distributed, load = (EP2_FSDP2, {}) if processes == 2 else ({"ep_size": 1}, {"device_map": "cuda"})
    forward = [
        {"name": "switch", "checkpoint": "switch", "generate": 5},
        {"name": "expert_choice", "checkpoint": "expert_choice", "load": EXPERT_CHOICE_ROUTING},
    ]
    forward = [{**task, "distributed": distributed, "load": {**task.get("load", {}), **load}} for task in forward]
    train = {"name": "train_switch", "checkpoint": "switch", "distributed": distributed, "load": load, "lr": LR}
    tasks = [*forward_tasks(forward, checkpoints), {**train, "mode": "train", "checkpoint": str(checkpoints["switch"])}]
    results = launch(tmp_path, processes, tasks, train_batch, gpus=True)
    for rank, rank_results in enumerate(results):
        for task in forward:
            on_cpu = {**task, "load": {key: value for key, value in task["load"].items() if key != "device_map"}}
            reference = one_process_forward(checkpoints[task["checkpoint"]], on_cpu, train_batch, rank)
            for field, expected in reference.items():
                actual = rank_results[f"{task['name']}/{field}"]
                if field == "generated":
                    assert torch.equal(actual, expected), f"{task['name']}: greedy tokens differ"
                else:
                    torch.testing.assert_close(actual, expected, atol=GPU_TOLERANCE, rtol=GPU_TOLERANCE)
    expected, _ = one_process_step(checkpoints["switch"], train_batch, distributed, micro_batches=True)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "train_switch").state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=GPU_TOLERANCE, rtol=GPU_TOLERANCE, msg=name)
