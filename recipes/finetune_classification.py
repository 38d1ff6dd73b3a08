"""Fine-tune a sparse MoE model for sequence classification (the Switch / ST-MoE fine-tuning setting)
with transformers' Trainer.

    accelerate launch --config_file recipes/accelerate/one_process.yaml \
        recipes/finetune_classification.py --config recipes/configs/classification_switch.yaml [--flag value ...]

or ``python recipes/finetune_classification.py --config ...``. Options: hf_moe's
(`hf_moe.training.MoeArguments`), the data (`ClassificationDataArguments`: text, optional pair and label columns,
``max_length``) and `MoeTrainingArguments` (transformers' `TrainingArguments`); unknown keys or flags
are errors. A new classification head
goes on the last non-padding token. Each evaluation scores the validation data and a fixed training
subset: task loss without the router terms, accuracy, F1 (binary for 2 labels, else macro), routing.
"""

import sys

import hf_moe.training  # noqa: F401  (before trl: a missing [train] extra is named in one line)

# isort: split
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
)
from trl import TrlParser

from hf_moe.metrics import accuracy, f1
from hf_moe.training import (
    ClassificationDataArguments,
    CompleteCheckpoints,
    MoeArguments,
    MoeCallback,
    MoeTrainingArguments,
    add_training_subset,
    check_columns,
    check_process_group,
    classifier_head_names,
    finish_run,
    fit_length_to_positions,
    label_names,
    load_model_for_finetuning,
    load_train_and_validation,
    prepare_run,
    run_recipe_main,
    select_trainable_parameters,
    tokenize_for_classification,
)


def main(argv: list[str] | None = None) -> dict:
    parser = TrlParser((MoeArguments, ClassificationDataArguments, MoeTrainingArguments))
    moe_args, data_args, training_args = parser.parse_args_and_config(sys.argv[1:] if argv is None else argv)
    run = prepare_run(moe_args, training_args)

    tokenizer = AutoTokenizer.from_pretrained(moe_args.tokenizer_name_or_path or moe_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with training_args.main_process_first():
        raw = load_train_and_validation(data_args, training_args.seed)
        check_columns(raw, text_column=data_args.text_column, text_pair_column=data_args.text_pair_column)
        check_columns(raw, label_column=data_args.label_column)
        names = label_names(raw, data_args.label_column)

    head = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
    model = load_model_for_finetuning(
        moe_args, AutoModelForSequenceClassification, pad_token_id=tokenizer.pad_token_id, **head
    )
    data_args.max_length = fit_length_to_positions(model, data_args.max_length, "max_length")
    with training_args.main_process_first():
        data = tokenize_for_classification(raw, tokenizer, data_args, names)
    if not moe_args.dense_control or moe_args.train_parameters == "lora":
        model = select_trainable_parameters(model, moe_args, head_names=classifier_head_names(model))

    def compute_metrics(prediction) -> dict:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions, references = logits.argmax(-1).tolist(), prediction.label_ids.tolist()
        average = "binary" if len(names) == 2 else "macro"
        return {
            **accuracy(predictions=predictions, references=references),
            **f1(predictions=predictions, references=references, average=average),
        }

    callbacks = [CompleteCheckpoints()]
    if moe_args.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(moe_args.early_stopping_patience, moe_args.early_stopping_threshold))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset={"validation": data["validation"]},
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    add_training_subset(trainer, moe_args.train_eval_samples)
    MoeCallback.attach(trainer)
    check_process_group(trainer.accelerator)
    print(
        f"{trainer.accelerator.num_processes} process(es), {trainer.accelerator.distributed_type.value}, "
        f"mixed precision {trainer.accelerator.mixed_precision}, {'dense control' if moe_args.dense_control else 'MoE'}"
    )
    trainer.train(resume_from_checkpoint=run.checkpoint)
    # A new head (and its labels) changes the base config: an adapter keeps its base next to it.
    return finish_run(
        trainer,
        tokenizer,
        moe_args,
        data_args,
        task="classification",
        auto_class="AutoModelForSequenceClassification",
        metric_names=["loss", "accuracy", "f1"],
        run=run,
        base_on_disk=False,
    )


if __name__ == "__main__":
    sys.exit(run_recipe_main(main))
