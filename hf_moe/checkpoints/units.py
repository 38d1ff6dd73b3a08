"""Sizes and dtypes given as text (``"5GB"``, ``"bfloat16"``), parsed and printed."""

import torch

from ..options import literal, option_error
from ..transformers_internals import convert_file_size_to_int

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise option_error(
        ValueError, f"{{dtype}} must be one of {list(DTYPES)} or None (keep the source's), got {literal(repr(dtype))}"
    )


def parse_size(size) -> int:
    try:
        value = convert_file_size_to_int(size)
    except (ValueError, TypeError, AttributeError):  # AttributeError: a float such as nan
        value = None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise option_error(
            ValueError,
            "{max_shard_size} must be a positive size such as '5GB', '500MB' or a number of bytes, "
            f"got {literal(repr(size))}",
        )
    return value


def format_bytes(count: int) -> str:
    """A size in the largest decimal unit that keeps it >= 1 (B, kB, MB, GB, TB)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
