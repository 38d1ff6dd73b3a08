"""Global-batch load balancing (Qiu et al. 2025, "Demons in the Detail", arXiv 2501.11873).

Two CPU processes (``torchrun --nproc_per_node 2``, gloo) each take half of a fixed batch, with
different numbers of padding tokens, and average their gradients as data parallelism does. With
``balance_scope="global_batch"`` the balancing loss and those gradients must equal one process's on
the concatenated batch; with ``"micro_batch"`` they must not (the test can fail).

This file is also the worker that torchrun starts: ``python -m torch.distributed.run
--nproc_per_node 2 tests/distributed/test_global_balancing.py OUT_DIR``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

import hf_moe

SCOPES = ("micro_batch", "global_batch")


def tiny_model(scope: str) -> hf_moe.SwitchMoeForCausalLM:
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
    config = hf_moe.SwitchMoeConfig(
        text_config=dense,
        num_experts=4,
        num_experts_per_tok=2,
        moe_layers="all",
        capacity_factor=1.0,  # drops some picks: f_i counts the picks before capacity
        router_init_std=0.5,  # an unbalanced router at the start, so the scopes differ clearly
        balance_scope=scope,
    )
    model = hf_moe.SwitchMoeForCausalLM(config)
    model.train()
    return model


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(4, 10) ids and mask: rows 0-1 go to process 0 and rows 2-3 to process 1, with 17 and 14
    non-padding tokens (left padding in row 3, right padding in row 2)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (4, 10), generator=generator)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[0, 9:] = 0
    mask[1, 8:] = 0
    mask[2, 6:] = 0
    mask[3, :2] = 0
    return ids, mask


def aux_loss_and_gradients(model, ids, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    aux_loss = model(input_ids=ids, attention_mask=mask).aux_loss
    aux_loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return aux_loss.detach(), grads


def worker(out_dir: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids, mask = global_batch()
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    result = {}
    for scope in SCOPES:
        model = tiny_model(scope)
        aux_loss, grads = aux_loss_and_gradients(model, ids[rows], mask[rows])
        for grad in grads.values():  # what data parallelism does: the mean over processes
            dist.all_reduce(grad)
            grad /= world
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, aux_loss)
        result[scope] = {"losses": torch.stack(losses), "grads": grads}
    if rank == 0:
        # An evaluation forward on one process only must not wait for the others (no collective).
        model.eval()
        result["eval_only_here"] = model(input_ids=ids[rows], attention_mask=mask[rows]).aux_loss
        torch.save(result, out_dir / "two_processes.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("global_balancing")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [__file__, str(out_dir)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return torch.load(out_dir / "two_processes.pt")


@pytest.fixture(scope="module")
def one_process() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids, mask = global_batch()
    return aux_loss_and_gradients(tiny_model("global_batch"), ids, mask)


def test_global_batch_loss_and_gradients_equal_one_process_on_the_concatenated_batch(two_processes, one_process):
    loss, grads = one_process
    two = two_processes["global_batch"]
    # Every process reports the loss of the whole batch, not only the mean over processes.
    torch.testing.assert_close(two["losses"], loss.expand(2), rtol=1e-6, atol=1e-7)
    assert set(two["grads"]) == set(grads)
    assert any(".router." in name for name in grads) and len(grads) > 4  # routers and the layers before them
    for name, grad in grads.items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_micro_batch_scope_differs_from_the_concatenated_batch(two_processes, one_process):
    loss, grads = one_process
    two = two_processes["micro_batch"]
    assert (two["losses"] - two["losses"][0]).abs().max() > 1e-3  # each process balances its own tokens
    assert (two["losses"].mean() - loss).abs() > 1e-3
    router = next(name for name in grads if ".router." in name)
    assert (two["grads"][router] - grads[router]).abs().max() > 1e-4


def test_evaluation_forward_balances_the_local_batch(two_processes):
    ids, mask = global_batch()
    local = tiny_model("micro_batch").eval()(input_ids=ids[:2], attention_mask=mask[:2]).aux_loss
    torch.testing.assert_close(two_processes["eval_only_here"], local)


def test_without_a_process_group_global_equals_micro_batch(one_process):
    ids, mask = global_batch()
    loss, grads = aux_loss_and_gradients(tiny_model("micro_batch"), ids, mask)
    assert torch.equal(loss, one_process[0])
    for name, grad in grads.items():
        assert torch.equal(grad, one_process[1][name]), name


def test_balance_scope_is_validated():
    with pytest.raises(
        ValueError, match=r"balance_scope must be one of \['micro_batch', 'global_batch'\], got 'global'"
    ):
        hf_moe.SwitchMoeConfig(balance_scope="global")


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
