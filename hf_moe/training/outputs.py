"""The output folder of a run: refusing to overwrite a finished run, complete checkpoints and resuming
from the latest one, and the evaluation history the model card shows.

Trainer writes ``checkpoint-N`` folders in place. `CompleteCheckpoints` marks a checkpoint complete
once Trainer has written all of it; resume takes only marked checkpoints, and every file of the one
it takes is read back first, so a partial or corrupt checkpoint is an error naming the file.
"""

import json
import os
import re
import shutil
import zipfile

from transformers import TrainerCallback

from .publish import SETTINGS_FILE

COMPLETE_MARKER = "checkpoint_complete"
STAGING_SUFFIX = ".overwrite-staging"
REPLACED_SUFFIX = ".replaced"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-N`` folders of ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def staging_dir(output_dir: str) -> str:
    """Where a run that replaces the one in ``output_dir`` is written until it is complete."""
    return os.path.normpath(output_dir) + STAGING_SUFFIX


def replaced_dir(output_dir: str) -> str:
    """Where the previous run waits, for the two renames of `publish_staged_run`, before it is removed."""
    return os.path.normpath(output_dir) + REPLACED_SUFFIX


def is_finished(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, SETTINGS_FILE))


def recover_interrupted_publish(output_dir: str) -> None:
    """Finish or undo a `publish_staged_run` that was killed between its renames. With no finished run
    in ``output_dir`` (gone, or re-created empty), the new run moves in if it is complete, else the
    previous run moves back; the previous run is removed only once a finished run is in place."""
    replaced, staged = replaced_dir(output_dir), staging_dir(output_dir)
    if not os.path.isdir(replaced):
        return
    if not is_finished(output_dir):
        if os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)
        if os.path.exists(output_dir):
            return  # something else is there: keep everything for the checks to report
        os.replace(staged if is_finished(staged) else replaced, output_dir)
    if is_finished(output_dir) and os.path.isdir(replaced):
        shutil.rmtree(replaced)


def check_output_dir(output_dir: str, overwrite: bool, resume: str | None, clean_up: bool = True) -> str:
    """Refuse an ``output_dir`` holding a finished run, or an interrupted one that is not being resumed,
    unless ``overwrite_output_dir``. Returns the folder the run writes into: ``output_dir``, or, when it
    replaces a run there, `staging_dir` (emptied first unless resuming an earlier replacement), which
    `publish_staged_run` moves into place once the new run is complete. Until then the previous run
    stays as it was, whatever happens to the new one. ``clean_up``: recover and empty folders (one
    process of a launch does it)."""
    if clean_up:
        recover_interrupted_publish(output_dir)
    finished = is_finished(output_dir)
    interrupted = bool(checkpoints(output_dir)) and not finished
    if overwrite and (finished or interrupted):
        staged = staging_dir(output_dir)
        if clean_up and resume is None and os.path.exists(staged):
            shutil.rmtree(staged)  # an earlier replacement that never finished
        return staged
    if finished:
        raise ValueError(
            f"output_dir {output_dir!r} holds a finished run ({SETTINGS_FILE}); pass --overwrite_output_dir true "
            "to replace it, or choose another output_dir"
        )
    if interrupted and resume is None:
        raise ValueError(
            f"output_dir {output_dir!r} holds checkpoints of an interrupted run "
            f"({os.path.basename(checkpoints(output_dir)[-1])}); "
            "pass --resume_from_checkpoint true to continue it, or --overwrite_output_dir true to start over"
        )
    return output_dir


def publish_staged_run(staged: str, output_dir: str) -> None:
    """Put the complete run in ``staged`` in the place of the previous one: two renames on one file
    system, then the previous run is removed (`recover_interrupted_publish` handles a kill in between)."""
    replaced = replaced_dir(output_dir)
    if os.path.exists(replaced):
        shutil.rmtree(replaced)
    if os.path.exists(output_dir):
        os.replace(output_dir, replaced)
    os.replace(staged, output_dir)
    if os.path.exists(replaced):
        shutil.rmtree(replaced)


def resolve_checkpoint(output_dir: str, resume: str | None) -> str | None:
    """The checkpoint to resume from: ``true``/``latest`` = the latest complete one in ``output_dir``;
    a path = that checkpoint. Each is checked with `check_checkpoint`."""
    if resume is None or resume.lower() in ("false", "none", ""):
        return None
    if resume.lower() in ("true", "latest"):
        complete = [c for c in checkpoints(output_dir) if os.path.isfile(os.path.join(c, COMPLETE_MARKER))]
        if not complete:
            raise FileNotFoundError(
                f"resume_from_checkpoint {resume!r}: no complete checkpoint in output_dir {output_dir!r} "
                f"(found {[os.path.basename(c) for c in checkpoints(output_dir)]})"
            )
        resume = complete[-1]
    check_checkpoint(resume)
    return resume


def check_checkpoint(folder: str) -> None:
    """Read back every file of a checkpoint; ValueError naming the file and what is wrong."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"resume_from_checkpoint: no such folder {folder!r}")
    marker = os.path.join(folder, COMPLETE_MARKER)
    if not os.path.isfile(marker):
        raise ValueError(
            f"checkpoint {folder!r} is incomplete (no {COMPLETE_MARKER}: its save was interrupted); "
            "resume from an earlier one, or --resume_from_checkpoint true for the latest complete one"
        )
    with open(marker) as f:
        written = f.read().splitlines()[1:]  # the step, then every file Trainer wrote (see CompleteCheckpoints)
    missing = [name for name in written if not os.path.exists(os.path.join(folder, name))]
    if missing:
        raise ValueError(
            f"checkpoint {folder!r} is missing {', '.join(missing)}, written with it when it was saved "
            "(resuming without them would restart the optimizer or scheduler silently); resume from another "
            "checkpoint, or restore the files"
        )
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".json"):
                with open(path) as f:
                    json.load(f)
            elif name.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        f.get_slice(key)
            elif name.endswith((".pt", ".pth", ".bin")):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    raise ValueError(f"entry {bad} fails its checksum")
        except Exception as error:
            raise ValueError(f"checkpoint file {path!r} is corrupt: {type(error).__name__}: {error}") from error


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once Trainer has written all of it (model, optimizer, scheduler,
    RNG and trainer states), listing those files."""

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            # The step, then the files written: resume refuses a checkpoint that lost one (optimizer.pt, ...).
            names = sorted(os.listdir(folder))
            with open(os.path.join(folder, COMPLETE_MARKER), "w") as f:
                f.write(f"{state.global_step}\n" + "".join(f"{name}\n" for name in names))


def evaluation_history(log_history: list[dict], metric_names: list[str], train_name: str = "train_subset"):
    """Rows ``{step, train, validation, gap}`` of every evaluation (task losses, without router terms),
    and the routing summary of the last one, from Trainer's log history with `MoeCallback`'s values."""
    # Trainer logs each evaluation set as its own entry: merge the entries of each step.
    merged: dict[int, dict] = {}
    for entry in log_history:
        if any(key.startswith("eval_") and key.endswith("task_loss") for key in entry):
            merged.setdefault(entry["step"], {}).update(entry)
    rows, routing = [], None
    for entry in merged.values():
        if "eval_validation_task_loss" not in entry:
            continue

        def metrics(prefix: str, entry: dict = entry) -> dict:
            values = {"loss": entry.get(f"{prefix}task_loss")}
            values.update({n: entry.get(f"{prefix}{n}") for n in metric_names if n != "loss"})
            return values

        validation = metrics("eval_validation_")
        train = metrics(f"eval_{train_name}_") if f"eval_{train_name}_task_loss" in entry else dict(validation)
        rows.append(
            {
                "step": entry["step"],
                "train": train,
                "validation": validation,
                "gap": entry.get("eval_validation_gap", 0.0),
            }
        )
        routing = routing_summary(entry, "eval_validation_") or routing
    return rows, routing


def routing_summary(entry: dict, prefix: str) -> dict | None:
    """``{layers, expert_load, balance, dropped_fraction, z_loss, aux_loss}`` from one logged evaluation."""
    pattern = re.compile(re.escape(prefix) + r"router/layer(\d+)/expert(\d+)$")
    load: dict[int, dict[int, float]] = {}
    for key, value in entry.items():
        if m := pattern.match(key):
            load.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
    if not load:
        return None
    layers = sorted(load)
    return {
        "layers": layers,
        "expert_load": [[load[layer][e] for e in sorted(load[layer])] for layer in layers],
        "balance": [entry[f"{prefix}router/layer{layer}/balance"] for layer in layers],
        "dropped_fraction": [entry[f"{prefix}router/layer{layer}/dropped_fraction"] for layer in layers],
        "z_loss": entry.get(f"{prefix}z_loss", 0.0),
        "aux_loss": entry.get(f"{prefix}aux_loss"),
    }
