"""Sparse upcycling: turn a dense transformers checkpoint into an hf_moe MoE checkpoint.

Export and import (`export_checkpoint`, `import_checkpoint`) convert hf_moe checkpoints to and
from the native transformers MoE architectures with the same streaming, publishing and verification.
`upcycle_model` converts an in-memory dense model; `upcycle_checkpoint` converts a checkpoint
directory (or Hub id) by streaming tensors, with bounded memory. Both share the weight mapping
and expert initialisation of `weights`. `plan_upcycling` says beforehand, from the config alone,
what a conversion and the training of its output need. Their options are one schema (`settings`):
`UpcyclingSettings` (`UpcyclingScheme` + `RoutingOptions`), `CheckpointOptions`, `PlanOptions` and, for
export and import, `NativeOptions`.
"""

from .convert import upcycle_checkpoint, upcycle_model
from .export import export_checkpoint, import_checkpoint
from .plan import TrainingMemory, UpcyclingPlan, plan_upcycling
from .settings import (
    EXPERT_INITS,
    ROUTINGS,
    CheckpointOptions,
    NativeOptions,
    PlanOptions,
    RoutingOptions,
    UpcyclingScheme,
    UpcyclingSettings,
    UpcyclingWarning,
)
from .verify import VerificationError, VerificationReport
from .weights import TESTED_MODEL_TYPES

__all__ = [
    "CheckpointOptions",
    "EXPERT_INITS",
    "NativeOptions",
    "PlanOptions",
    "ROUTINGS",
    "RoutingOptions",
    "TESTED_MODEL_TYPES",
    "TrainingMemory",
    "UpcyclingPlan",
    "UpcyclingScheme",
    "UpcyclingSettings",
    "UpcyclingWarning",
    "VerificationError",
    "VerificationReport",
    "export_checkpoint",
    "import_checkpoint",
    "plan_upcycling",
    "upcycle_checkpoint",
    "upcycle_model",
]
