"""The generated model card, and Hub-id sources resolved offline from the local cache."""

import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

import hf_moe  # noqa: F401
from hf_moe import upcycle_checkpoint
from hf_moe.cards import format_count


def test_card_describes_the_model(save_dense, tmp_path):
    _, source = save_dense("llama")
    output = upcycle_checkpoint(
        source, tmp_path / "moe", num_experts=4, num_experts_per_tok=2, moe_layers="all", verify=True, progress=False
    )
    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "transformers"
    assert set(card.data.tags) >= {"moe", "upcycled", "switch_moe"}
    assert card.data.base_model is None  # a local path is not a Hub id

    model = AutoModelForCausalLM.from_pretrained(output)
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(p.numel() for block in model.moe_blocks() for p in block.experts.parameters()) // 4
    active = total - 4 * per_expert + 2 * per_expert
    text = card.text
    assert f"| parameters, total | {format_count(total)} |" in text
    assert f"| parameters, active per token | {format_count(active)} |" in text
    assert "| experts per MoE layer | 4 |" in text and "top-2 of 4, gates renormalised" in text
    assert "| MoE layers | 0, 1, 2 (of 3) |" in text
    assert "MoE layer 2:" in text  # verification numbers
    assert 'AutoModelForCausalLM.from_pretrained("moe", trust_remote_code=True)' in text


@pytest.fixture
def hub_cache(save_dense, tmp_path, monkeypatch):
    """A local Hub cache holding tiny/llama at a fixed commit, with the Hub unreachable."""
    _, source = save_dense("llama")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--llama"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return commit


def test_hub_id_is_resolved_from_the_cache_offline(hub_cache, tmp_path):
    output = upcycle_checkpoint("tiny/llama", tmp_path / "moe", num_experts=2, progress=False)
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.upcycling["source"] == "tiny/llama" and model.config.upcycling["revision"] == hub_cache
    assert "source_sha256" not in model.config.upcycling  # the commit identifies the weights
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == "tiny/llama" and f"(revision `{hub_cache}`)" in card.text
    assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_unknown_revision_is_a_clear_error(hub_cache, tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"source='tiny/llama' is not a local directory and could not be fetched .*\(revision v2\): [^\n]*[^.]\. "
        r"Offline, the model must already be in the local Hub cache$",
    ):
        upcycle_checkpoint("tiny/llama", tmp_path / "moe", revision="v2", progress=False)
    assert not (tmp_path / "moe").exists()
