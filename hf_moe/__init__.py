"""hf_moe: sparse Mixture-of-Experts models for the Hugging Face ecosystem.

``import hf_moe`` registers the Switch (``switch_moe``) and Expert Choice (``expert_choice_moe``)
architectures with transformers' Auto classes.
"""

from .compare import compare_runs
from .modeling import *  # noqa: F403
from .modeling import __all__ as _modeling_all
from .upcycling import upcycle_checkpoint, upcycle_model

__version__ = "0.1.0"
__all__ = [*_modeling_all, "compare_runs", "upcycle_checkpoint", "upcycle_model"]
