"""Resuming reproduces the uninterrupted run; output folders and checkpoints are never silently misused."""

import shutil

import pytest
from recipe_helpers import clm_settings, run_recipe, train_records

COMMON = {
    "max_steps": 16,
    "eval_steps": 4,
    "save_strategy": "steps",
    "save_steps": 12,
    "expert_dropout": 0.4,
    "backbone_dropout": 0.1,
    "router_jitter_noise": 0.01,
    "warmup_steps": 3,
    "lr_scheduler_type": "cosine",
}


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    result = run_recipe("finetune_clm", clm_settings(assets, root / "full", **COMMON), root)
    return root, result


def test_resume_gives_the_same_losses_as_the_uninterrupted_run(assets, full_run, tmp_path):
    # Dropout everywhere and jitter: the RNG state must be restored too. Batches of 4 over ~43
    # blocks: the checkpoint at step 12 lies inside the second epoch, so the sampler state matters.
    root, full = full_run
    checkpoint = root / "full" / "checkpoint-12"
    assert (checkpoint / "checkpoint_complete").is_file()
    settings = clm_settings(assets, tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), **COMMON)
    resumed = run_recipe("finetune_clm", settings, tmp_path)
    full_steps = {r["step"]: r for r in train_records(root / "full")}
    resumed_steps = [r for r in train_records(tmp_path / "resumed") if r["step"] > 12]
    assert [r["step"] for r in resumed_steps] == [13, 14, 15, 16]
    for record in resumed_steps:
        expected = full_steps[record["step"]]
        assert record["loss"] == pytest.approx(expected["loss"], abs=1e-5), record["step"]
        assert record["learning_rate"] == pytest.approx(expected["learning_rate"], rel=1e-6)
    assert resumed["history"][-1]["validation"]["loss"] == pytest.approx(
        full["history"][-1]["validation"]["loss"], abs=1e-5
    )
    # The evaluation history before the checkpoint travels with it: the final report sees every step.
    assert [row["step"] for row in resumed["history"]] == [0, 4, 8, 12, 16]


def test_a_finished_run_is_not_overwritten_without_the_flag(assets, full_run):
    root, _ = full_run
    before = (root / "full" / "model.safetensors").read_bytes()
    with pytest.raises(
        ValueError, match="holds a finished run \\(finetune_config.yaml\\); pass --overwrite_output_dir true"
    ):
        run_recipe("finetune_clm", clm_settings(assets, root / "full", max_steps=1), root)
    assert (root / "full" / "model.safetensors").read_bytes() == before


def test_overwrite_replaces_the_whole_folder(assets, full_run, tmp_path):
    root, _ = full_run
    shutil.copytree(root / "full", tmp_path / "copy")
    run_recipe(
        "finetune_clm", clm_settings(assets, tmp_path / "copy", max_steps=2, overwrite_output_dir=True), tmp_path
    )
    assert not list((tmp_path / "copy").glob("checkpoint-*")), "no stale checkpoints next to the new model"
    assert max(r["step"] for r in train_records(tmp_path / "copy")) == 2


def test_resume_takes_the_latest_complete_checkpoint(assets, full_run, tmp_path):
    """An interrupted run: checkpoint-12 complete, a later one half-written (killed during its save)."""
    root, _ = full_run
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(root / "full" / "checkpoint-12", run / "checkpoint-12")
    partial = run / "checkpoint-14"
    shutil.copytree(root / "full" / "checkpoint-12", partial)
    (partial / "checkpoint_complete").unlink()
    (partial / "optimizer.pt").write_bytes((partial / "optimizer.pt").read_bytes()[:100])
    with pytest.raises(
        ValueError,
        match="holds checkpoints of an interrupted run \\(checkpoint-14\\); pass --resume_from_checkpoint true",
    ):
        run_recipe("finetune_clm", clm_settings(assets, run, **COMMON), tmp_path)
    with pytest.raises(ValueError, match=f"checkpoint '{partial}' is incomplete \\(no checkpoint_complete"):
        run_recipe("finetune_clm", clm_settings(assets, run, resume_from_checkpoint=str(partial), **COMMON), tmp_path)
    result = run_recipe("finetune_clm", clm_settings(assets, run, resume_from_checkpoint="true", **COMMON), tmp_path)
    assert [r["step"] for r in train_records(run) if r["step"] > 12] == [13, 14, 15, 16]
    assert result["history"][-1]["step"] == 16


@pytest.mark.parametrize("name", ["optimizer.pt", "trainer_state.json", "model.safetensors"])
def test_corrupt_checkpoint_names_the_file(assets, full_run, tmp_path, name):
    root, _ = full_run
    checkpoint = tmp_path / "checkpoint-12"
    shutil.copytree(root / "full" / "checkpoint-12", checkpoint)
    data = (checkpoint / name).read_bytes()
    (checkpoint / name).write_bytes(data[: len(data) // 2])
    settings = clm_settings(assets, tmp_path / "out", resume_from_checkpoint=str(checkpoint), **COMMON)
    with pytest.raises(ValueError, match=f"checkpoint file '{checkpoint / name}' is corrupt: "):
        run_recipe("finetune_clm", settings, tmp_path)
