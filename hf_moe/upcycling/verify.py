"""Check a converted checkpoint against its dense source.

Layer by layer, the same random hidden states go through the dense feed-forward block (dense
tensors, cast to the output dtype) and through the new MoE block (read back from the written
shards), all in float32 and eval mode. Then, when both models fit in memory, whole-model outputs
on random tokens are compared. Deviations are relative: max |moe - dense| / max |dense|.

Function-preserving settings (sparse upcycling, Komatsuzaki et al. 2023, §3): every expert a copy and the
combine weights of each token summing to 1 with nothing dropped, i.e. token choice with
``norm_topk_prob=True`` and dropless evaluation (with ``granularity`` G too: every virtual group of G
shards then sums to the dense MLP, see `weights.granular_experts`), or expert choice in threshold mode
with the untrained (zero) thresholds, where every token reaches every expert; and, whatever the routing and
expert init, a shared expert holding the whole dense FFN beside routed experts that start at zero
(`weights.shared_expert_init`). There the deviation must be
<= 1e-5, otherwise the conversion fails; for other settings it is measured and reported.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from ..checkpoints.streaming import CheckpointReader
from .weights import BACKBONE_PREFIX, ConversionPlan, dense_intermediate_size, resolve_dtype

TOLERANCE = 1e-5
VERIFY_BATCH, VERIFY_SEQ_LEN = 2, 16


class VerificationError(RuntimeError):
    """A conversion that should compute the dense function does not."""


def preserves_dense_function(config, moe_class, expert_init: str, dense_width: int | None = None) -> bool:
    """Whether the upcycled model computes the dense function: a shared expert holding the whole dense FFN
    (``dense_width`` neurons) leaves the routed experts a zero contribution whatever the routing and init."""
    shared = getattr(config, "shared_expert_intermediate_size", None)
    if shared and shared == dense_width:
        return True
    return expert_init == "copy" and moe_class.routing_method.computes_dense_function(config, moe_class)


@dataclass
class VerificationReport:
    function_preserving: bool
    layer_deviation: dict[int, float] = field(default_factory=dict)  # MoE layer -> relative max deviation
    model_deviation: float | None = None  # whole-model outputs; None when skipped
    model_skipped_reason: str | None = None
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        if not self.function_preserving:
            return True
        deviations = list(self.layer_deviation.values()) + (
            [self.model_deviation] if self.model_deviation is not None else []
        )
        return all(d <= self.tolerance for d in deviations)

    def as_dict(self) -> dict:
        return {
            "function_preserving": self.function_preserving,
            "tolerance": self.tolerance if self.function_preserving else None,
            "layer_max_relative_deviation": {str(k): v for k, v in self.layer_deviation.items()},
            "model_max_relative_deviation": self.model_deviation,
            "model_comparison_skipped": self.model_skipped_reason,
            "passed": self.passed,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "VerificationReport":
        """Inverse of `as_dict` (e.g. read back from config.json's ``upcycling.verification``)."""
        return cls(
            function_preserving=data["function_preserving"],
            layer_deviation={int(k): v for k, v in data["layer_max_relative_deviation"].items()},
            model_deviation=data["model_max_relative_deviation"],
            model_skipped_reason=data["model_comparison_skipped"],
            tolerance=data["tolerance"] or TOLERANCE,
        )

    def summary(self) -> str:
        kind = (
            f"function-preserving settings, tolerance {self.tolerance:g}"
            if self.function_preserving
            else "settings that change the function: measured only"
        )
        lines = [f"Verification ({kind}):"]
        lines += [f"  layer {layer:3d}: max relative deviation {d:.3e}" for layer, d in self.layer_deviation.items()]
        if self.model_deviation is not None:
            lines.append(f"  whole model outputs: max relative deviation {self.model_deviation:.3e}")
        else:
            lines.append(f"  whole model comparison skipped: {self.model_skipped_reason}")
        if self.function_preserving:
            lines.append("  PASSED" if self.passed else "  FAILED")
        return "\n".join(lines)


def relative_deviation(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _materialise(meta_module: torch.nn.Module, read: Callable[[str], torch.Tensor]) -> torch.nn.Module:
    """A float32 CPU copy of a meta-device module, every tensor of its state dict read by name."""
    module = copy.deepcopy(meta_module).to_empty(device="cpu")
    module.load_state_dict({name: read(name).float() for name in module.state_dict()})
    return module.float().eval()


@torch.no_grad()
def verify_conversion(
    plan: ConversionPlan,
    read_dense: Callable[[str], torch.Tensor],
    output_dir: Path,
    source_dir: Path,
    target_dtype: torch.dtype | None,
    expert_init: str,
    seed: int,
) -> VerificationReport:
    config = plan.config
    report = VerificationReport(
        preserves_dense_function(config, plan.moe_class, expert_init, dense_intermediate_size(plan))
    )
    hidden_size = config.text_config.hidden_size
    generator = torch.Generator().manual_seed(seed)

    def read_dense_as_output(name: str) -> torch.Tensor:
        tensor = read_dense(name)
        return tensor.to(resolve_dtype(tensor.dtype, target_dtype))

    with CheckpointReader(output_dir) as written:
        for layer, block_name in plan.feed_forward_blocks.items():
            prefix = f"{block_name}."
            dense_mlp = _materialise(
                plan.meta_dense.get_submodule(block_name), lambda n, p=prefix: read_dense_as_output(p + n)
            )
            moe_block = _materialise(
                plan.meta_moe.get_submodule(BACKBONE_PREFIX + block_name),
                lambda n, p=BACKBONE_PREFIX + prefix: written.read(p + n),
            )
            hidden = torch.randn(VERIFY_BATCH, VERIFY_SEQ_LEN, hidden_size, generator=generator)
            report.layer_deviation[layer] = relative_deviation(moe_block(hidden), dense_mlp(hidden))
            del dense_mlp, moe_block

    needed = 4 * 2 * sum(p.numel() for p in plan.meta_moe.parameters())  # both models in float32, generously
    available = psutil.virtual_memory().available
    if needed > available // 2:
        report.model_skipped_reason = f"needs about {needed / 1e9:.1f} GB, {available / 1e9:.1f} GB available"
        return report
    report.model_deviation = _compare_models(plan, output_dir, source_dir, target_dtype, generator)
    return report


def _compare_models(plan, output_dir, source_dir, target_dtype, generator) -> float:
    auto_class = plan.moe_class.dense_auto_class  # the same Auto class loads both heads
    dense = auto_class.from_pretrained(source_dir, dtype=torch.float32).eval()
    if target_dtype is not None:
        for parameter in dense.parameters():  # the rounding the output went through; buffers stay exact
            parameter.data = parameter.data.to(target_dtype).float()
    moe = auto_class.from_pretrained(output_dir, dtype=torch.float32).eval()
    vocab_size = plan.config.text_config.vocab_size
    input_ids = torch.randint(0, vocab_size, (1, 2 * VERIFY_SEQ_LEN), generator=generator)
    dense_out, moe_out = dense(input_ids=input_ids), moe(input_ids=input_ids)
    key = "logits" if "logits" in dense_out else "last_hidden_state"
    return relative_deviation(moe_out[key], dense_out[key])
