"""Routing health: the balance of a layer's expert load and the expert-load heat map.

The balance figure of a layer is the normalised perplexity of its load distribution,
exp(H(load)) / E: 1.0 when every expert gets the same share of tokens, 1/E when one expert gets
them all.
"""

import math

import torch

from ..plotting import pyplot


def load_balance(load: torch.Tensor) -> float:
    """exp(entropy of the load) / experts, in [1/E, 1]."""
    p = load[load > 0]
    entropy = -(p * p.log()).sum().item()
    return math.exp(entropy) / load.numel()


def plot_expert_load(summary: dict, path: str, title: str = "Expert load (fraction of tokens)") -> str:
    """Heat map of the per-layer expert load, written as a PNG at ``path``."""
    plt = pyplot("the expert-load plot")

    load = torch.tensor(summary["expert_load"])
    layers, experts = load.shape
    figure, axes = plt.subplots(figsize=(1.2 + 0.6 * experts, 1.2 + 0.5 * layers))
    image = axes.imshow(load.numpy(), cmap="viridis", vmin=0.0, aspect="auto")
    axes.set_xticks(range(experts))
    axes.set_yticks(range(layers), [f"layer {i}" for i in summary["layers"]])
    axes.set_xlabel("expert")
    for i in range(layers):
        for j in range(experts):
            axes.text(j, i, f"{load[i, j]:.2f}", ha="center", va="center", color="white", fontsize=7)
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
