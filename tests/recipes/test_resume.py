"""A run resumed from a saved checkpoint reproduces the uninterrupted run (same losses at the same steps)."""

import pytest
from recipe_helpers import clm_settings, read_metrics, run_recipe, train_records


def test_resume_gives_the_same_losses_as_the_uninterrupted_run(assets, tmp_path):
    # Dropout everywhere and jitter: the RNG state must be restored too. Batches of 4 over ~43
    # blocks: the checkpoint at step 12 lies inside the second epoch, so the sampler state matters.
    common = {
        "max_steps": 16,
        "eval_steps": 4,
        "save_steps": 12,
        "expert_dropout": 0.4,
        "backbone_dropout": 0.1,
        "router_jitter_noise": 0.01,
        "warmup_steps": 3,
        "lr_scheduler_type": "cosine",
    }
    full = run_recipe("finetune_clm", clm_settings(assets, tmp_path / "full", **common), tmp_path)
    checkpoint = tmp_path / "full" / "checkpoints" / "step_12"
    assert (checkpoint / "training_state.json").is_file()
    resumed = run_recipe(
        "finetune_clm",
        clm_settings(assets, tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), **common),
        tmp_path,
    )

    full_steps = {r["step"]: r for r in train_records(tmp_path / "full")}
    resumed_steps = train_records(tmp_path / "resumed")
    assert [r["step"] for r in resumed_steps] == [13, 14, 15, 16]
    for record in resumed_steps:
        expected = full_steps[record["step"]]
        assert record["train/loss"] == pytest.approx(expected["train/loss"], abs=1e-5), record["step"]
        assert record["train/lr"] == pytest.approx(expected["train/lr"], rel=1e-6)
    assert resumed["history"][-1]["validation"]["loss"] == pytest.approx(
        full["history"][-1]["validation"]["loss"], abs=1e-5
    )
    # The evaluation history before the checkpoint travels with it: the final report sees every step.
    assert [row["step"] for row in resumed["history"]] == [0, 4, 8, 12, 16]
    assert resumed["best"]["step"] == full["best"]["step"]
    assert all(r["step"] > 12 for r in read_metrics(tmp_path / "resumed"))
