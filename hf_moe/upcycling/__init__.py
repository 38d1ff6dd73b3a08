"""Sparse upcycling: turn a dense transformers checkpoint into an hf_moe MoE checkpoint.

Export and import (`export_checkpoint`, `import_checkpoint`) convert hf_moe checkpoints to and
from the native transformers MoE architectures with the same streaming, publishing and verification.
`upcycle_model` converts an in-memory dense model; `upcycle_checkpoint` converts a checkpoint
directory (or Hub id) by streaming tensors, with bounded memory. Both share the weight mapping
and expert initialisation of `weights`.
"""

from .convert import upcycle_checkpoint, upcycle_model
from .export import export_checkpoint, import_checkpoint
from .settings import EXPERT_INITS, ROUTINGS, UpcyclingSettings, UpcyclingWarning
from .verify import VerificationError, VerificationReport
from .weights import TESTED_MODEL_TYPES

__all__ = [
    "EXPERT_INITS",
    "ROUTINGS",
    "TESTED_MODEL_TYPES",
    "UpcyclingSettings",
    "UpcyclingWarning",
    "VerificationError",
    "VerificationReport",
    "export_checkpoint",
    "import_checkpoint",
    "upcycle_checkpoint",
    "upcycle_model",
]
