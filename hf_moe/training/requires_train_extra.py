"""Imported first by `hf_moe.training`: without the [train] extra it stops with one line naming it."""

from ..optional_dependencies import require_train_extra

require_train_extra("hf_moe.training")
