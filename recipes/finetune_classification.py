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
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer
from trl import TrlParser

from hf_moe.metrics import accuracy, f1
from hf_moe.training import (
    ClassificationDataArguments,
    MoeArguments,
    MoeTrainingArguments,
    finish_run,
    load_classification_dataset,
    load_model,
    prepare_run,
    prepare_trainer,
    run_recipe_main,
)


def main(argv: list[str] | None = None) -> dict:
    parser = TrlParser((MoeArguments, ClassificationDataArguments, MoeTrainingArguments))
    moe_args, data_args, training_args = parser.parse_args_and_config(sys.argv[1:] if argv is None else argv)
    # The output folder (a finished run is replaced only when asked), the checkpoint to resume from,
    # max_length capped at the model's positions.
    run = prepare_run(moe_args, data_args, training_args)

    tokenizer = AutoTokenizer.from_pretrained(moe_args.tokenizer_name_or_path or moe_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with training_args.main_process_first():
        data, labels = load_classification_dataset(data_args, tokenizer, training_args.seed)
    # A new head for the labels on an hf_moe checkpoint or a dense one upcycled on the fly; then what trains.
    model = load_model(moe_args, AutoModelForSequenceClassification, labels=labels, pad_token_id=tokenizer.pad_token_id)

    def compute_metrics(prediction) -> dict:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions, references = logits.argmax(-1).tolist(), prediction.label_ids.tolist()
        average = "binary" if len(labels) == 2 else "macro"
        return {
            **accuracy(predictions=predictions, references=references),
            **f1(predictions=predictions, references=references, average=average),
        }

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset={"validation": data["validation"]},
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    # MoeCallback, a training subset scored for the gap, complete checkpoints, early stopping.
    prepare_trainer(trainer, run)
    trainer.train(resume_from_checkpoint=run.checkpoint)

    # The model (or adapter, with its base: the new head changes it), settings and card; pushed if asked.
    return finish_run(trainer, run, task="classification", metric_names=["loss", "accuracy", "f1"])


if __name__ == "__main__":
    sys.exit(run_recipe_main(main))
