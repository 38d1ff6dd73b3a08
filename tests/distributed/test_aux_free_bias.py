"""Auxiliary-loss-free balancing under data parallelism: the bias update reads the global load.

Two CPU processes (``torchrun --nproc_per_node 2``, gloo) each take half of a fixed batch (different
padding), run a training forward and an optimizer step: every process must end with the biases one
process gets from the whole batch, which differ from those of its own half (so the test can fail).

This file is also the worker that torchrun starts: ``python -m torch.distributed.run
--nproc_per_node 2 tests/distributed/test_aux_free_bias.py OUT_DIR``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

import hf_moe


def tiny_model() -> hf_moe.AuxFreeMoeForCausalLM:
    dense = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    config = hf_moe.AuxFreeMoeConfig(
        text_config=dense, num_experts=8, moe_layers="all", router_init_std=0.5, bias_update_rate=0.01
    )
    return hf_moe.AuxFreeMoeForCausalLM(config).train()


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(4, 10): rows 0-1 go to process 0 and rows 2-3 to process 1."""
    ids = torch.randint(1, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[0, 7:] = 0
    mask[3, :3] = 0
    return ids, mask


def biases_after_one_step(model, ids, mask) -> torch.Tensor:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    optimizer.step()
    return torch.stack([block.router.expert_bias.clone() for block in model.moe_blocks()])  # (layers, experts)


def worker(out_dir: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids, mask = global_batch()
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    biases = biases_after_one_step(tiny_model(), ids[rows], mask[rows])
    gathered = [torch.zeros_like(biases) for _ in range(world)]
    dist.all_gather(gathered, biases)
    if rank == 0:
        torch.save(torch.stack(gathered), out_dir / "biases.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> torch.Tensor:
    out_dir = tmp_path_factory.mktemp("aux_free_bias")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [__file__, str(out_dir)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return torch.load(out_dir / "biases.pt")  # (processes, layers, experts)


def test_every_process_applies_the_update_of_the_global_load(two_processes):
    ids, mask = global_batch()
    whole = biases_after_one_step(tiny_model(), ids, mask)
    assert torch.equal(two_processes[0], two_processes[1])  # identical biases on every process
    assert torch.equal(two_processes[0], whole)
    halves = [biases_after_one_step(tiny_model(), ids[rows], mask[rows]) for rows in (slice(0, 2), slice(2, 4))]
    assert not torch.equal(halves[0], whole) or not torch.equal(halves[1], whole)  # local loads would differ


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
