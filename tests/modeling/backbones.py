"""Tiny random configs of the dense backbones every architecture must support."""

import torch
from transformers import AutoConfig

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

BACKBONES = {
    "llama": dict(COMMON),
    "mistral": dict(COMMON, sliding_window=8),
    "qwen2": dict(COMMON),
    "qwen3": dict(COMMON, head_dim=8),
    "gemma3_text": dict(COMMON, head_dim=8, sliding_window=8, query_pre_attn_scalar=8),
    "phi3": dict(COMMON),
    "olmo2": dict(COMMON),
    "gpt2": dict(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=4,
        n_head=4,
        n_positions=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def dense_config(model_type: str, **overrides):
    """A tiny fp32 config of the named backbone with eager-safe defaults."""
    return AutoConfig.for_model(model_type, **{**BACKBONES[model_type], **overrides})


def learn_thresholds(model):
    """A few training forwards so expert-choice score thresholds are learned (not 0); leaves eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(3, VOCAB, (4, 16)).to(model.device))
    model.eval()
    assert all((block.router.score_thresholds > 0).all() for block in model.moe_blocks())


def copy_dense_into_experts(moe_model, dense_model):
    """Every expert a copy of the dense MLP; every other weight shared."""
    dense_state = dense_model.state_dict()
    moe_state = moe_model.state_dict()
    for name, tensor in moe_state.items():
        dense_name = name.removeprefix("backbone.").replace(".experts.", ".")
        if dense_name in dense_state:
            tensor.copy_(dense_state[dense_name].expand_as(tensor))
