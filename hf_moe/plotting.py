"""The one way hf_moe draws a figure: matplotlib's pyplot on the file-only Agg backend.

Every plot (``hf-moe compare``, the training callback's PNGs, the study's figures) is written to a
file, on machines without a display; matplotlib belongs to the [train] extra, so a missing install
stops with the one line naming it.
"""

from types import ModuleType

from .optional_dependencies import import_train_module


def pyplot(feature: str) -> ModuleType:
    """``matplotlib.pyplot`` with the Agg backend; ``feature`` names the plot in the missing-extra error."""
    matplotlib = import_train_module("matplotlib", feature)
    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot
