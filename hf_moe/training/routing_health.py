"""Routing health over an evaluation: per-layer expert load, balance, dropped tokens, router losses.

The balance figure of a layer is the normalised perplexity of its load distribution,
exp(H(load)) / E: 1.0 when every expert gets the same share of tokens, 1/E when one expert gets
them all.
"""

import math

import torch


class RoutingHealth:
    """Accumulates the routing statistics of ``MoeModelOutput``s, weighted by non-padding tokens."""

    def __init__(self):
        self.tokens = 0.0
        self.load_sum: torch.Tensor | None = None  # (moe_layers, experts)
        self.dropped_sum: torch.Tensor | None = None  # (moe_layers,)
        self.z_loss_sum = 0.0
        self.aux_loss_sum = 0.0
        self.has_aux_loss = False

    @torch.no_grad()
    def add(self, outputs, num_tokens: int) -> None:
        load = outputs.expert_load.detach().float().cpu() * num_tokens
        dropped = outputs.dropped_fraction.detach().float().cpu() * num_tokens
        self.load_sum = load if self.load_sum is None else self.load_sum + load
        self.dropped_sum = dropped if self.dropped_sum is None else self.dropped_sum + dropped
        self.z_loss_sum += float(outputs.z_loss) * num_tokens
        if outputs.aux_loss is not None:
            self.has_aux_loss = True
            self.aux_loss_sum += float(outputs.aux_loss) * num_tokens
        self.tokens += num_tokens

    def summary(self, accelerator=None, moe_layers: list[int] | None = None) -> dict:
        """Token-weighted means over everything added (summed over processes when ``accelerator`` is given)."""
        totals = torch.cat(
            [self.load_sum.flatten(), self.dropped_sum, torch.tensor([self.z_loss_sum, self.aux_loss_sum, self.tokens])]
        )
        if accelerator is not None and accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        layers, experts = self.load_sum.shape
        load = totals[: layers * experts].view(layers, experts)
        dropped = totals[layers * experts : layers * experts + layers]
        z_loss, aux_loss, tokens = totals[-3:].tolist()
        load = load / load.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        names = moe_layers if moe_layers is not None else list(range(layers))
        return {
            "layers": [int(i) for i in names],
            "expert_load": load.tolist(),
            "balance": [load_balance(row) for row in load],
            "dropped_fraction": (dropped / max(tokens, 1)).tolist(),
            "z_loss": z_loss / max(tokens, 1),
            "aux_loss": aux_loss / max(tokens, 1) if self.has_aux_loss else None,
        }


def load_balance(load: torch.Tensor) -> float:
    """exp(entropy of the load) / experts, in [1/E, 1]."""
    p = load[load > 0]
    entropy = -(p * p.log()).sum().item()
    return math.exp(entropy) / load.numel()


def flatten_routing_summary(summary: dict, prefix: str = "routing") -> dict[str, float]:
    """Scalars for experiment trackers: per layer balance, dropped fraction and each expert's load."""
    scalars = {f"{prefix}/z_loss": summary["z_loss"]}
    if summary["aux_loss"] is not None:
        scalars[f"{prefix}/aux_loss"] = summary["aux_loss"]
    for layer, load, balance, dropped in zip(
        summary["layers"], summary["expert_load"], summary["balance"], summary["dropped_fraction"], strict=True
    ):
        scalars[f"{prefix}/layer{layer}/balance"] = balance
        scalars[f"{prefix}/layer{layer}/dropped_fraction"] = dropped
        for expert, share in enumerate(load):
            scalars[f"{prefix}/layer{layer}/expert{expert}_load"] = share
    return scalars


def format_routing_summary(summary: dict) -> str:
    """A few printable lines: one per MoE layer."""
    lines = [
        f"routing: z_loss {summary['z_loss']:.4f}"
        + (f", aux_loss {summary['aux_loss']:.4f}" if summary["aux_loss"] is not None else "")
    ]
    for layer, load, balance, dropped in zip(
        summary["layers"], summary["expert_load"], summary["balance"], summary["dropped_fraction"], strict=True
    ):
        shares = " ".join(f"{share:.2f}" for share in load)
        lines.append(f"  layer {layer}: balance {balance:.3f}, dropped {dropped:.3f}, load [{shares}]")
    return "\n".join(lines)


def plot_expert_load(summary: dict, path: str, title: str = "Expert load (fraction of tokens)") -> str:
    """Heat map of the per-layer expert load, written as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
