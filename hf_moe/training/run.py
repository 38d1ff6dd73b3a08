"""A fine-tuning run from start to end: the three calls a recipe makes around its trainer.

    run = prepare_run(moe_args, data_args, training_args)  # before anything is built
    ...  # tokenizer, data, model, trainer
    prepare_trainer(trainer, run)  # once the trainer is built
    trainer.train(resume_from_checkpoint=run.checkpoint)
    return finish_run(trainer, run, task="causal-lm", metric_names=["loss", "perplexity"])

`prepare_run` checks the options and the output folder and picks the checkpoint to resume from;
`prepare_trainer` adds what an MoE run logs and keeps (`MoeCallback`, a training subset for the
gap, complete checkpoints, early stopping); `finish_run` saves the model or adapter, the settings
and the model card, puts the run in place of the one it replaces and pushes it if asked.
"""

import dataclasses
import json
import os
from dataclasses import dataclass

from transformers import AutoConfig, EarlyStoppingCallback

from .arguments import DataArguments, MoeArguments, non_finite_options
from .callback import MoeCallback
from .model_loading import check_process_group, fit_length_to_positions
from .outputs import CompleteCheckpoints, check_output_dir, evaluation_history, publish_staged_run, resolve_checkpoint
from .publish import HISTORY_FILE, push_folder_to_hub, save_model_folder, write_model_card
from .trainers import is_moe_model

# Training options worth a line in the model card and finetune_config.yaml (Trainer has ~150).
TRAINING_SETTINGS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "max_length",
    "packing",
    "eval_steps",
    "metric_for_best_model",
    "seed",
    "output_dir",
    "hub_model_id",
)
# What the saved folder of each task loads with, and whether an adapter's base is the checkpoint on disk
# (a new classification head and its labels change the base config: the base is saved next to the adapter).
TASKS = {
    "causal-lm": {"auto_class": "AutoModelForCausalLM", "base_on_disk": True},
    "classification": {"auto_class": "AutoModelForSequenceClassification", "base_on_disk": False},
}


@dataclass
class PreparedRun:
    """What `prepare_run` decided: the checkpoint to resume from, the Hub repository to push to at the end,
    and where the finished run goes (``output_dir``); ``training_args.output_dir`` is where it is written,
    a staging folder when it replaces an earlier run. ``moe_args`` and ``data_args``: the run's options,
    saved with it."""

    checkpoint: str | None
    hub_repo: str | None
    output_dir: str
    moe_args: MoeArguments
    data_args: DataArguments


def prepare_run(moe_args: MoeArguments, data_args: DataArguments, training_args) -> PreparedRun:
    """Before building anything: the trainer's numbers checked, the output-folder check (a run that
    replaces another is written to a staging folder: ``training_args.output_dir`` is changed), the
    checkpoint to resume from, the metric for the best model, the Hub upload taken over from Trainer
    (which would create the repository at start and fail offline), and ``max_length`` (the data's or
    the trainer's) capped at the model's positions, with a warning."""
    problems = non_finite_options(training_args)
    if problems:
        raise ValueError(f"Invalid {type(training_args).__name__}:\n  - " + "\n  - ".join(problems))
    resume = training_args.resume_from_checkpoint
    output_dir = training_args.output_dir
    # The main process recovers or cleans up first; the others then see the same folders and decide alike.
    with training_args.main_process_first(local=False, desc="output_dir check"):
        training_args.output_dir = check_output_dir(
            output_dir, moe_args.overwrite_output_dir, resume, clean_up=training_args.process_index == 0
        )
    training_args.resume_from_checkpoint = None
    checkpoint = resolve_checkpoint(training_args.output_dir, resume)
    if training_args.metric_for_best_model is None:
        training_args.metric_for_best_model, training_args.greater_is_better = "eval_validation_task_loss", False
    hub_repo = None
    if training_args.push_to_hub:
        if not training_args.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (e.g. 'your-name/switch-finetuned')")
        hub_repo, training_args.push_to_hub = training_args.hub_model_id, False
    with_length = [options for options in (data_args, training_args) if hasattr(options, "max_length")]
    if with_length:
        # The positions of the model that trains: the checkpoint's config (upcycling keeps the dense one's).
        model_config = AutoConfig.from_pretrained(moe_args.model_name_or_path)
        for options in with_length:
            options.max_length = fit_length_to_positions(model_config, options.max_length, "max_length")
    return PreparedRun(checkpoint, hub_repo, output_dir, moe_args, data_args)


def prepare_trainer(trainer, run: PreparedRun) -> None:
    """Once the trainer is built: `MoeCallback` ahead of the reporting callbacks, a fixed subset of the
    prepared training data (``train_eval_samples`` sequences) evaluated in evaluation mode alongside
    the validation data for the overfitting gap, `CompleteCheckpoints` (resume takes only complete
    checkpoints) and early stopping (``early_stopping_patience``). Fails when the launch asked for
    something accelerate did not set up (`check_process_group`); prints the set-up."""
    moe_args = run.moe_args
    trainer.add_callback(CompleteCheckpoints())
    if moe_args.early_stopping_patience > 0:
        trainer.add_callback(EarlyStoppingCallback(moe_args.early_stopping_patience, moe_args.early_stopping_threshold))
    add_training_subset(trainer, moe_args.train_eval_samples)
    MoeCallback.attach(trainer)
    accelerator = trainer.accelerator
    check_process_group(accelerator)
    sharded = trainer.is_distributed_loading_by_transformers
    print(
        f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
        f"mixed precision {accelerator.mixed_precision}, {'dense control' if moe_args.dense_control else 'MoE'}"
        + (f", sharded at load time {moe_args.distributed_config}" if sharded else "")
    )


def add_training_subset(trainer, samples: int) -> None:
    """Evaluate a fixed subset of the prepared training data (after tokenizing and packing: ``samples``
    sequences) in evaluation mode alongside the validation data, for the overfitting gap. It goes first,
    so the validation row of each evaluation logs the gap."""
    if samples > 0:
        subset = trainer.train_dataset.select(range(min(samples, len(trainer.train_dataset))))
        trainer.eval_dataset = {"train_subset": subset, **trainer.eval_dataset}


def finish_run(trainer, run: PreparedRun, *, task: str, metric_names: list[str]) -> dict:
    """Save the model (or adapter) and the trainer's tokenizer, the settings, the trainer state, the model
    card; put the run in place of the one it replaces (``run``: `prepare_run`'s); push if asked.
    ``task``: one of `TASKS`; ``metric_names``: the evaluation metrics the card shows. Returns the
    evaluation history, the best evaluation, the output folder and the trainer's log history."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    moe_args, data_args, args = run.moe_args, run.data_args, trainer.args
    settings = {**dataclasses.asdict(moe_args), **dataclasses.asdict(data_args)}
    settings.update({name: getattr(args, name) for name in TRAINING_SETTINGS if hasattr(args, name)})
    settings = {k: v.value if hasattr(v, "value") else v for k, v in settings.items()}
    settings["output_dir"] = run.output_dir  # not the staging folder it is written to
    # The precision the trainer ran with (--bf16/--fp16, or the launcher's ACCELERATE_MIXED_PRECISION).
    settings["mixed_precision"] = str(trainer.accelerator.mixed_precision)
    trainer.save_state()
    history, routing = evaluation_history(trainer.state.log_history, metric_names)
    best_step = trainer.state.best_global_step or (history[-1]["step"] if history else None)
    best_row = next((row for row in history if row["step"] == best_step), history[-1] if history else None)
    best = None
    if best_row is not None:
        metric = args.metric_for_best_model.removeprefix("eval_validation_").removeprefix("task_")
        best = {
            "step": best_row["step"],
            "metric": args.metric_for_best_model,
            "value": best_row["validation"].get(metric, best_row["validation"]["loss"]),
            "train_loss": best_row["train"]["loss"],
            "validation_loss": best_row["validation"]["loss"],
            "gap": best_row["gap"],
        }
    # The settings file goes last: its presence marks a finished run.
    saved = save_model_folder(
        trainer.accelerator,
        trainer.model,
        trainer.processing_class,
        moe_args,
        args.output_dir,
        settings,
        TASKS[task]["base_on_disk"],
    )
    if trainer.is_world_process_zero():
        if is_moe_model(trainer.model) and history and routing is not None:
            dataset = data_args.dataset_name or os.path.basename(data_args.train_file)
            write_model_card(
                args.output_dir,
                settings=settings,
                model=saved["model"],
                task=task,
                auto_class=TASKS[task]["auto_class"],
                history=history,
                best=best,
                routing=routing,
                dataset=dataset,
                saved=saved,
                metric_names=metric_names,
            )
        else:
            with open(os.path.join(args.output_dir, HISTORY_FILE), "w") as f:
                json.dump({"evaluations": history, "best": best, "routing": None}, f, indent=1)
        if history:
            final = history[-1]
            print(
                f"Final step {final['step']}: validation task loss {final['validation']['loss']:.4f}, "
                f"training subset {final['train']['loss']:.4f}, gap {final['gap']:+.4f}"
                + (f"; best step {best['step']}" if best else "")
            )
        if args.output_dir != run.output_dir:
            publish_staged_run(args.output_dir, run.output_dir)
        if run.hub_repo is not None:
            print(push_folder_to_hub(run.output_dir, run.hub_repo))
        print(f"Saved the fine-tuned {saved['kind']} in {os.path.abspath(run.output_dir)}")
    trainer.accelerator.wait_for_everyone()
    args.output_dir = run.output_dir
    return {"history": history, "best": best, "output_dir": run.output_dir, "log_history": trainer.state.log_history}
