"""One rank of a distributed test: load hf_moe checkpoints with transformers' DistributedConfig, run
the tasks and save this rank's results for the test to compare with one process.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/distributed/worker.py SPEC.json

SPEC.json: {"inputs": the batch (torch.save), "out": a folder, "tasks": [...]}; a task is {"name",
"checkpoint", "distributed": DistributedConfig kwargs, "load": other from_pretrained kwargs, "mode":
"forward" (with "generate": new tokens) or "train" (with "lr": one SGD step)}. Each rank writes
out/rank<r>.pt, {"<task>/<field>": tensor}; a train task also saves the trained model to out/<task>
(save_pretrained gathers the shards).
"""

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from ep_tasks import data_slice, forward_results, labels_of, routing_fields  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402

import hf_moe  # noqa: E402,F401  (registers the architectures)


def train_step(model, batch: dict, lr: float) -> dict:
    model.train()
    output = model(**batch, labels=labels_of(batch))
    output.loss.backward()
    torch.optim.SGD(model.parameters(), lr=lr).step()
    return {"loss": output.loss.detach(), **routing_fields(output)}


def experts_held(model) -> dict:
    """Per MoE block: how many experts its module routes to here, and the rows of its first weight
    on this rank (the expert dim, split by expert parallelism and then by FSDP over efsdp)."""
    blocks = model.moe_blocks()
    rows = [next(block.experts.parameters()) for block in blocks]
    rows = [weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0] for weight in rows]
    return {
        "experts_per_rank": torch.tensor([block.experts.num_experts for block in blocks]),
        "expert_weight_rows": torch.tensor(rows),
    }


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    batch = torch.load(spec["inputs"])
    results = {}
    for task in spec["tasks"]:
        distributed = DistributedConfig(**task["distributed"])
        model = AutoModelForCausalLM.from_pretrained(
            task["checkpoint"], distributed_config=distributed, **task.get("load", {})
        )
        # The dense mesh is (fsdp, tp) with tp inner: the ranks of a tensor-parallel group share rows.
        local = data_slice(batch, distributed.fsdp_size, dist.get_rank() // distributed.tp_size)
        if task["mode"] == "train":
            fields = train_step(model, local, task["lr"])
            model.save_pretrained(Path(out) / task["name"])  # on every rank: rank 0 writes the gathered weights
        else:
            fields = forward_results(model, local, task.get("generate", 0))
            fields.update(experts_held(model))
        results.update({f"{task['name']}/{field}": value for field, value in fields.items()})
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
