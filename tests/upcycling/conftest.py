"""Fixtures: tiny dense checkpoints saved to tmp dirs."""

import pytest
from tiny_models import tiny_dense


@pytest.fixture
def save_dense(tmp_path):
    """save_dense(model_type, sharded=False, **config) -> (dense model, checkpoint dir)."""

    def save(model_type: str, sharded: bool = False, name: str | None = None, **overrides):
        model = tiny_dense(model_type, **overrides)
        folder = tmp_path / (name or f"{model_type}-{'sharded' if sharded else 'single'}")
        model.save_pretrained(folder, max_shard_size="20KB" if sharded else "5GB")
        return model, folder

    return save
