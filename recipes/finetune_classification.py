"""Fine-tune a sparse MoE model for sequence classification (the Switch / ST-MoE fine-tuning setting).

Launch (one process; data_parallel.yaml / fsdp2.yaml for several):

    accelerate launch --config_file recipes/accelerate/one_process.yaml \
        recipes/finetune_classification.py --config recipes/configs/classification_switch.yaml [--key value ...]

or without accelerate:
``python recipes/finetune_classification.py --config recipes/configs/classification_switch.yaml``.
Every setting is a field of `hf_moe.training.ClassificationConfig`; unknown keys or flags are errors.

The model is an hf_moe checkpoint, or a dense checkpoint upcycled on the fly (``upcycle``
section); a new classification head is added on top of the last non-padding token.
Regularisation follows Switch Table 4 and ST-MoE (docs/moe-reference.md, "Fine-tuning"): expert dropout
0.4 with backbone dropout 0.1, router z-loss, training only the non-MoE parameters.
Each evaluation scores the validation data and a fixed subset of the training data (both in
evaluation mode) side by side: loss, accuracy, F1, and the routing health of every MoE layer.
"""

import json
import math
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, get_scheduler

from hf_moe.metrics import load_metric
from hf_moe.training import (
    ClassificationConfig,
    RoutingHealth,
    check_columns,
    check_process_group,
    classifier_head_names,
    flatten_routing_summary,
    format_routing_summary,
    label_names,
    load_model_for_finetuning,
    load_train_and_validation,
    parse_recipe_args,
    push_folder_to_hub,
    save_model_folder,
    select_trainable_parameters,
    tokenize_for_classification,
    write_model_card,
)

TRAINING_STATE = "training_state.json"


@torch.no_grad()
def evaluate(model, loader, accelerator, description: str, metrics: dict, num_labels: int) -> tuple[dict, dict]:
    """Mean loss, accuracy and F1 (binary for 2 labels, else macro) over ``loader`` (evaluation
    mode), and the routing health. ``metrics``: the loaded "accuracy" and "f1" modules."""
    model.eval()
    accuracy, f1 = metrics["accuracy"], metrics["f1"]
    health = RoutingHealth()
    loss_sum, examples = 0.0, 0
    for batch in tqdm(loader, desc=description, leave=False, disable=not accelerator.is_local_main_process):
        outputs = model(**batch)
        logits = outputs.logits.float()  # (batch, labels)
        losses = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        predictions, references, losses = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], losses))
        accuracy.add_batch(predictions=predictions.tolist(), references=references.tolist())
        f1.add_batch(predictions=predictions.tolist(), references=references.tolist())
        loss_sum += losses.sum().item()
        examples += losses.numel()
        health.add(outputs, num_tokens=int(batch["attention_mask"].sum()))
    model.train()
    metrics = {
        "loss": loss_sum / examples,
        **accuracy.compute(),
        **f1.compute(average="binary" if num_labels == 2 else "macro"),
    }
    moe_layers = accelerator.unwrap_model(model).config.moe_layers
    return metrics, health.summary(accelerator, moe_layers)


def main(argv: list[str] | None = None) -> dict:
    config = parse_recipe_args(ClassificationConfig, sys.argv[1:] if argv is None else argv)
    trackers = [t for t in config.report_to if t != "none"]
    accelerator = Accelerator(
        # Without a GPU, launched processes must be CPU processes to join a (gloo) process group.
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # Shuffling seeded by (seed, epoch): the same order on every process, and after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        log_with=trackers or None,
        project_dir=config.output_dir,
    )
    check_process_group(accelerator)
    accelerator.print(
        f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
        f"mixed precision {accelerator.mixed_precision}, device {accelerator.device}"
    )
    set_seed(config.seed)

    # Data: load, check columns, tokenize on the main process first so others reuse the cache.
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path or config.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with accelerator.main_process_first():
        raw = load_train_and_validation(config)
        check_columns(
            raw,
            text_column=config.text_column,
            text_pair_column=config.text_pair_column,
            label_column=config.label_column,
        )
        names = label_names(raw, config.label_column)
        data = tokenize_for_classification(raw, tokenizer, config, names)
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    train_subset = data["train"].select(range(min(config.train_eval_samples, len(data["train"]))))
    # Each loader draws its worker seed from its own generator, not the global RNG: a resumed run
    # then continues the global RNG stream (dropout masks) exactly where the checkpoint left it.
    loader_options = {"collate_fn": collate, "generator": torch.Generator().manual_seed(config.seed)}
    train_loader = DataLoader(
        data["train"], shuffle=True, batch_size=config.per_device_train_batch_size, **loader_options
    )
    eval_loader = DataLoader(data["validation"], batch_size=config.per_device_eval_batch_size, **loader_options)
    train_eval_loader = DataLoader(train_subset, batch_size=config.per_device_eval_batch_size, **loader_options)

    # Model: an hf_moe checkpoint or a dense one upcycled on the fly, with a new head of len(names)
    # labels (it reads the last non-padding token, found through pad_token_id); then choose what trains.
    set_seed(config.seed)
    model = load_model_for_finetuning(
        config,
        AutoModelForSequenceClassification,
        num_labels=len(names),
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})  # reentrant loses the router losses
    model = select_trainable_parameters(model, config, head_names=classifier_head_names(model))

    # Optimizer: no weight decay on biases and norms (1-D tensors).
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for n, p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    model, optimizer, train_loader, eval_loader, train_eval_loader = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, train_eval_loader
    )
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    max_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_scheduler(
        config.lr_scheduler_type,
        optimizer,
        num_warmup_steps=config.warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    scheduler = accelerator.prepare(scheduler)
    accelerator.init_trackers(
        "finetune_classification",
        config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(config).items()},
    )

    # Resume: model, optimizer, scheduler, RNG and sampler states, plus our step counters.
    state = {
        "step": 0,
        "epoch": 0,
        "batches_in_epoch": 0,
        "history": [],
        "best": None,
        "evaluations_without_improvement": 0,
    }
    if config.resume_from_checkpoint:
        accelerator.load_state(config.resume_from_checkpoint)
        with open(os.path.join(config.resume_from_checkpoint, TRAINING_STATE)) as f:
            state = json.load(f)
        accelerator.print(f"Resumed from {config.resume_from_checkpoint} at step {state['step']}")
    log_path = os.path.join(config.output_dir, "metrics.jsonl")
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        if not config.resume_from_checkpoint and os.path.exists(log_path):
            os.remove(log_path)

    def log(record: dict) -> None:
        accelerator.log(
            {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=record["step"]
        )
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    metrics = {"accuracy": load_metric("accuracy"), "f1": load_metric("f1")}

    def run_evaluation() -> bool:
        """Evaluate, log train and validation side by side, track the best step; True = stop early."""
        validation, routing = evaluate(model, eval_loader, accelerator, "validation", metrics, len(names))
        train, _ = evaluate(model, train_eval_loader, accelerator, "train subset", metrics, len(names))
        gap = validation["loss"] - train["loss"]
        row = {"step": state["step"], "train": train, "validation": validation, "gap": gap, "routing": routing}
        state["history"].append(row)
        log(
            {
                "step": state["step"],
                "eval/loss": validation["loss"],
                "eval/accuracy": validation["accuracy"],
                "eval/f1": validation["f1"],
                "eval/train_loss": train["loss"],
                "eval/train_accuracy": train["accuracy"],
                "eval/gap": gap,
                **flatten_routing_summary(routing),
            }
        )
        accelerator.print(
            f"step {state['step']}: train loss {train['loss']:.4f} (accuracy {train['accuracy']:.3f}) | "
            f"validation loss {validation['loss']:.4f} (accuracy {validation['accuracy']:.3f}, "
            f"F1 {validation['f1']:.3f}) | gap {gap:+.4f}\n"
            f"{format_routing_summary(routing)}"
        )
        value = validation[config.metric_for_best_model]
        best = state["best"]
        sign = 1 if config.greater_is_better else -1
        if best is None or sign * (value - best["value"]) > config.early_stopping_threshold:
            state["best"] = {
                "step": state["step"],
                "metric": config.metric_for_best_model,
                "value": value,
                "train_loss": train["loss"],
                "validation_loss": validation["loss"],
                "gap": gap,
            }
            state["evaluations_without_improvement"] = 0
        else:
            state["evaluations_without_improvement"] += 1
        patience = config.early_stopping_patience
        return patience > 0 and state["evaluations_without_improvement"] >= patience

    # Training loop.
    model.train()
    if state["step"] == 0 and config.eval_at_start:
        run_evaluation()
    progress = tqdm(
        total=max_steps, initial=state["step"], desc="training", disable=not accelerator.is_local_main_process
    )
    sums = {"loss": 0.0, "z_loss": 0.0, "aux_loss": 0.0, "dropped_fraction": 0.0, "micro_batches": 0}
    stop = False
    while state["step"] < max_steps and not stop:
        train_loader.set_epoch(state["epoch"])
        skip = state["batches_in_epoch"]
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state["batches_in_epoch"] += 1
            sums["loss"] += outputs.loss.item()
            sums["z_loss"] += outputs.z_loss.item()
            sums["aux_loss"] += outputs.aux_loss.item() if outputs.aux_loss is not None else 0.0
            sums["dropped_fraction"] += outputs.dropped_fraction.mean().item()
            sums["micro_batches"] += 1
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            progress.update(1)
            # Mean over this step's micro-batches and all processes.
            means = accelerator.reduce(
                torch.tensor(
                    [sums[k] for k in ("loss", "z_loss", "aux_loss", "dropped_fraction")], device=accelerator.device
                )
                / sums["micro_batches"],
                reduction="mean",
            )
            sums = dict.fromkeys(sums, 0.0)
            unwrapped_config = accelerator.unwrap_model(model).config
            loss, z_loss, aux_loss, dropped = means.tolist()
            routing_term = (
                unwrapped_config.router_z_loss_coef * z_loss
                + getattr(unwrapped_config, "router_aux_loss_coef", 0.0) * aux_loss
            )
            record = {
                "step": state["step"],
                "train/loss": loss,
                "train/task_loss": loss - routing_term,
                "train/z_loss": z_loss,
                "train/aux_loss": aux_loss,
                "train/dropped_fraction": dropped,
                "train/lr": scheduler.get_last_lr()[0],
            }
            log(record)
            if state["step"] % config.logging_steps == 0:
                progress.set_postfix(loss=f"{loss:.4f}", z_loss=f"{z_loss:.3f}")
            if config.eval_steps and state["step"] % config.eval_steps == 0:
                stop = run_evaluation()
            if config.save_steps and state["step"] % config.save_steps == 0:
                checkpoint = os.path.join(config.output_dir, "checkpoints", f"step_{state['step']}")
                accelerator.save_state(checkpoint)
                if accelerator.is_main_process:
                    with open(os.path.join(checkpoint, TRAINING_STATE), "w") as f:
                        json.dump(state, f)
            if state["step"] >= max_steps or stop:
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
    progress.close()
    if not state["history"] or state["history"][-1]["step"] != state["step"]:
        run_evaluation()
    if stop:
        accelerator.print(
            f"Early stopping at step {state['step']}: no improvement of {config.metric_for_best_model} "
            f"in {config.early_stopping_patience} evaluations"
        )

    # Outputs: model (or adapter), tokenizer, settings, card with the expert-load plot; optional upload.
    # The base of a LoRA adapter has a new head (labels), so it is saved with the adapter.
    saved = save_model_folder(accelerator, model, tokenizer, config, config.output_dir, base_on_disk=False)
    best, final = state["best"], state["history"][-1]
    if accelerator.is_main_process:
        write_model_card(
            config.output_dir,
            config=config,
            model=saved["model"],
            task="sequence-classification",
            auto_class="AutoModelForSequenceClassification",
            history=[{k: v for k, v in row.items() if k != "routing"} for row in state["history"]],
            best=best,
            routing=final["routing"],
            dataset=config.dataset_name or os.path.basename(config.train_file),
            saved=saved,
            metric_names=["loss", "accuracy", "f1"],
        )
    accelerator.print(
        f"Best step {best['step']}: validation {best['metric']} {best['value']:.4f}, gap {best['gap']:+.4f}. "
        f"Final step {final['step']}: train loss {final['train']['loss']:.4f}, "
        f"validation loss {final['validation']['loss']:.4f} (accuracy {final['validation']['accuracy']:.3f}, "
        f"F1 {final['validation']['f1']:.3f}), gap {final['gap']:+.4f}."
    )
    if config.push_to_hub and accelerator.is_main_process:
        accelerator.print(push_folder_to_hub(config.output_dir, config.hub_model_id))
    accelerator.print(f"Saved the fine-tuned {saved['kind']} in {os.path.abspath(config.output_dir)}")
    accelerator.end_training()
    return {"history": state["history"], "best": best, "output_dir": config.output_dir}


if __name__ == "__main__":
    main()
