"""The [train] extra: what it adds to the core, and the one error a feature raises without it.

``pip install hf-moe`` is the core: the models, ``from_pretrained``/``generate``, the converter
(``hf-moe upcycle/export/import``) and model cards. Fine-tuning (`hf_moe.training`, the recipes),
`upcycle_model`, the plots and ``hf-moe compare`` need ``pip install "hf-moe[train]"``; without
it they stop when used, with one line naming the extra, and ``import hf_moe`` still works.
"""

import importlib
import importlib.metadata
import sys
from types import ModuleType

TRAIN_EXTRA = 'pip install "hf-moe[train]"'
# Import name -> distribution name of every package of the [train] extra (pyproject.toml).
TRAIN_PACKAGES = {
    "accelerate": "accelerate",
    "datasets": "datasets",
    "matplotlib": "matplotlib",
    "peft": "peft",
    "tensorboard": "tensorboard",
    "trl": "trl",
    "yaml": "pyyaml",
}


def _installed(module: str) -> bool:
    if module in sys.modules and sys.modules[module] is None:  # None there means "not importable"
        return False
    # The distribution, not find_spec or sys.modules: a folder named like the module (recipes/accelerate/,
    # which holds launch configs) passes for a namespace package, and may already be imported as one.
    try:
        importlib.metadata.distribution(TRAIN_PACKAGES[module])
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def require_train_extra(feature: str, modules: tuple[str, ...] = tuple(TRAIN_PACKAGES)) -> None:
    """Raise ImportError naming ``feature``, the missing packages and the extra, if any is missing."""
    missing = [TRAIN_PACKAGES[m] for m in modules if not _installed(m)]
    if missing:
        raise ImportError(f"{feature} needs the [train] extra ({', '.join(missing)} not installed): {TRAIN_EXTRA}")


def import_train_module(module: str, feature: str) -> ModuleType:
    """``import module`` (one of TRAIN_PACKAGES), or the one-line error of `require_train_extra`."""
    require_train_extra(feature, (module,))
    return importlib.import_module(module)
