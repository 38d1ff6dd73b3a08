"""The transformers internals hf_moe relies on (hf_moe/transformers_internals.py) exist in the installed
release, and package code reaches transformers internals only through that module.

Each check is one test per entry, so a release that moves a name fails naming it. hf_moe/modeling/
is copied into checkpoints and imports its entries itself; its imports must be entries too.
"""

import ast
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

PACKAGE = Path(__file__).resolve().parents[1] / "hf_moe"
INTERNALS = PACKAGE / "transformers_internals.py"
sys.path.insert(0, str(Path(__file__).parent / "modeling"))
from backbones import BACKBONES  # noqa: E402

# Documented transformers API: top-level names that are not modules, and transformers.utils.
PUBLIC_MODULES = ("transformers", "transformers.utils")


def internal_imports(path: Path) -> set[tuple[str, str]]:
    """(module, name) of every import of a transformers internal in one file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("transformers"):
            for alias in node.names:
                submodule = node.module == "transformers" and importlib.util.find_spec(f"transformers.{alias.name}")
                if node.module not in PUBLIC_MODULES or submodule:
                    found.add((node.module, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("transformers.") and alias.name not in PUBLIC_MODULES:
                    found.add(tuple(alias.name.rsplit(".", 1)))
    return found


ENTRIES = sorted(internal_imports(INTERNALS))
VERSION = f"transformers {transformers.__version__}"


def internals():
    import hf_moe.transformers_internals

    return hf_moe.transformers_internals


def resolve(module: str, name: str):
    """``module.name``: a submodule (transformers' lazy module does not always have it as an
    attribute), else an attribute; None when neither exists."""
    try:
        return importlib.import_module(f"{module}.{name}")
    except ImportError:
        return getattr(importlib.import_module(module), name, None)


@pytest.mark.parametrize("module, name", ENTRIES, ids=[f"{m}.{n}" for m, n in ENTRIES])
def test_imported_internal_exists(module, name):
    assert resolve(module, name) is not None, f"{module}.{name} (transformers_internals.py) is gone from {VERSION}"


def test_initialization_functions_exist():
    initialization = resolve("transformers", "initialization")
    missing = [n for n in internals().INITIALIZATION_FUNCTIONS if not hasattr(initialization, n)]
    assert not missing, f"transformers.initialization.{missing} (INITIALIZATION_FUNCTIONS) are gone from {VERSION}"


def test_model_class_attributes_exist():
    missing = [n for n in internals().MODEL_CLASS_ATTRIBUTES if not hasattr(PreTrainedModel, n)]
    assert not missing, f"PreTrainedModel.{missing} (MODEL_CLASS_ATTRIBUTES) are gone from {VERSION}"


def test_model_instance_attributes_exist():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **BACKBONES["llama"]))
    missing = [n for n in internals().MODEL_INSTANCE_ATTRIBUTES if not hasattr(model, n)]
    assert not missing, f"{missing} (MODEL_INSTANCE_ATTRIBUTES) are gone from built models in {VERSION}"


@pytest.mark.parametrize("model_type", sorted(BACKBONES))
def test_backbone_attribute_names(model_type):
    names = internals()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **BACKBONES[model_type]))
    prefix = model.base_model_prefix
    assert prefix in names.HEAD_DECODER_PREFIXES, f"{model_type}: base_model_prefix {prefix!r} (HEAD_DECODER_PREFIXES)"
    decoder = getattr(model, prefix)
    layer_lists = [n for n in names.LAYER_LIST_NAMES if isinstance(getattr(decoder, n, None), torch.nn.ModuleList)]
    assert layer_lists, f"{model_type}: the decoder has none of LAYER_LIST_NAMES {names.LAYER_LIST_NAMES}"
    layer = getattr(decoder, layer_lists[0])[0]
    blocks = [n for n in names.FEED_FORWARD_NAMES if hasattr(layer, n)]
    assert blocks, f"{model_type}: a layer has none of FEED_FORWARD_NAMES {names.FEED_FORWARD_NAMES}"


def test_modeling_code_borrows_only_entries():
    # The code copied into checkpoints keeps its own imports and copies; they must be entries here.
    from hf_moe.modeling import modeling_moe

    for path in sorted((PACKAGE / "modeling").glob("*.py")):
        extra = internal_imports(path) - set(ENTRIES)
        assert not extra, f"{path.name} imports transformers internals {extra} missing from transformers_internals.py"
        text = path.read_text()
        calls = set(re.findall(r"\binit\.(\w+)\(", text))
        assert calls <= set(internals().INITIALIZATION_FUNCTIONS), f"{path.name}: init.{calls} not all entries"
        flags = set(re.findall(r"\b(_supports_\w+|_keys_to_ignore_\w+|_tp_plan)\b", text))
        assert flags <= set(internals().MODEL_CLASS_ATTRIBUTES), f"{path.name}: {flags} not all MODEL_CLASS_ATTRIBUTES"
    for name in ("HEAD_DECODER_PREFIXES", "LAYER_LIST_NAMES", "FEED_FORWARD_NAMES"):
        assert getattr(modeling_moe, name) == getattr(internals(), name), f"modeling_moe.{name} differs from the entry"


def test_package_code_reaches_internals_only_through_the_module():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == INTERNALS or path.parent.name == "modeling":
            continue
        found = internal_imports(path)
        assert not found, f"{path.relative_to(PACKAGE)} imports {found}: import them from hf_moe.transformers_internals"
