"""Tiny random dense models built from small configs in code (shared by the upcycling tests)."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
LLAMA_LIKE = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    **SPECIAL,
)
TINY_CONFIGS = {
    "llama": LLAMA_LIKE,
    "mistral": {**LLAMA_LIKE, "sliding_window": 8},
    "qwen2": LLAMA_LIKE,
    "qwen3": {**LLAMA_LIKE, "head_dim": 8},
    "gemma3_text": {**LLAMA_LIKE, "head_dim": 8, "sliding_window": 8},
    "phi3": LLAMA_LIKE,
    "olmo2": LLAMA_LIKE,
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=64, **SPECIAL),
}
ROUND_TRIP_TYPES = ("llama", "qwen3", "gemma3_text", "phi3", "olmo2", "gpt2")


def tiny_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})


def tiny_dense(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()
    # Random init leaves some norms at exactly 1 / biases at 0; perturb everything so a tensor
    # routed to the wrong place cannot go unnoticed.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def leftovers(folder) -> list[str]:
    """Sorted entry names of ``folder``: what a conversion left there."""
    return sorted(p.name for p in folder.iterdir())
