"""Session-wide tiny assets for the recipe tests (built once: tokenizer, checkpoints, data files)."""

import pytest
from recipe_helpers import make_assets


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    return make_assets(tmp_path_factory.mktemp("recipe_assets"))
