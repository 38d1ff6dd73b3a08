"""hf_moe: sparse Mixture-of-Experts models for the Hugging Face ecosystem.

``import hf_moe`` registers the Switch (``switch_moe``), Expert Choice (``expert_choice_moe``) and
auxiliary-loss-free (``aux_free_moe``) architectures with transformers' Auto classes.
"""

from .compare import compare_runs
from .modeling import *  # noqa: F403
from .modeling import __all__ as _modeling_all
from .modeling.configuration_moe import HF_MOE_VERSION as __version__
from .upcycling import export_checkpoint, import_checkpoint, upcycle_checkpoint, upcycle_model

__all__ = [
    *_modeling_all,
    "__version__",
    "compare_runs",
    "export_checkpoint",
    "import_checkpoint",
    "upcycle_checkpoint",
    "upcycle_model",
]
