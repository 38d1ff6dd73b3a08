"""hf_moe.training's public API is small (like TRL's: a trainer, its config, the options and a few
functions a script calls), and the recipes use nothing else of hf_moe."""

import ast
import importlib

import pytest
from recipe_helpers import RECIPES

import hf_moe.training

PUBLIC_TRAINING_API = [
    # For any Trainer / TRL script.
    "MoeCallback",
    "MoeSFTConfig",
    "MoeSFTTrainer",
    # The options of a recipe.
    "ClassificationDataArguments",
    "DataArguments",
    "MoeArguments",
    "MoeTrainingArguments",
    # The steps of a recipe, in the order it calls them.
    "prepare_run",
    "load_sft_dataset",
    "load_classification_dataset",
    "load_model",
    "prepare_trainer",
    "finish_run",
    "run_recipe_main",
]


def test_hf_moe_training_exports_the_small_public_list():
    assert sorted(hf_moe.training.__all__) == sorted(PUBLIC_TRAINING_API)
    missing = [name for name in hf_moe.training.__all__ if not hasattr(hf_moe.training, name)]
    assert not missing, f"in __all__ but not defined: {missing}"
    # What the recipes needed before stays importable from its module, outside __all__.
    from hf_moe.training.data import load_train_and_validation  # noqa: F401
    from hf_moe.training.model_loading import load_model_for_finetuning  # noqa: F401
    from hf_moe.training.outputs import CompleteCheckpoints  # noqa: F401
    from hf_moe.training.trainable import select_trainable_parameters  # noqa: F401

    assert "select_trainable_parameters" not in hf_moe.training.__all__


def hf_moe_imports(recipe: str) -> list[tuple[str, str | None]]:
    """(module, name) of every import of hf_moe in ``recipes/<recipe>.py``; name None for ``import module``."""
    tree = ast.parse((RECIPES / f"{recipe}.py").read_text(), filename=f"{recipe}.py")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hf_moe":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "hf_moe"]
    return found


@pytest.mark.parametrize("recipe", ["finetune_clm", "finetune_classification", "demo"])
def test_recipes_import_only_public_names_of_hf_moe(recipe):
    imports = hf_moe_imports(recipe)
    assert imports, f"{recipe}.py imports nothing of hf_moe: the parser missed its imports"
    for module_name, name in imports:
        module = importlib.import_module(module_name)
        public = getattr(module, "__all__", None)
        assert public is not None, f"{recipe}.py imports from {module_name}, which has no public API (__all__)"
        if name is not None:
            assert name in public, f"{recipe}.py imports {name} from {module_name}, which does not export it"


def test_finish_run_names_the_tasks_it_knows():
    run = hf_moe.training.run.PreparedRun(None, None, "out", None, None)
    with pytest.raises(ValueError, match=r"task must be one of \['causal-lm', 'classification'\], got 'translation'"):
        hf_moe.training.finish_run(None, run, task="translation", metric_names=["loss"])
