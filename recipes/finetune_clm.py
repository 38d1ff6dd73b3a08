"""Fine-tune a sparse MoE causal LM (or continue its pre-training) with TRL's SFTTrainer.

    accelerate launch --config_file recipes/accelerate/one_process.yaml \
        recipes/finetune_clm.py --config recipes/configs/clm_switch.yaml [--flag value ...]

or ``python recipes/finetune_clm.py --config ...``. Options: hf_moe's (`hf_moe.training.MoeArguments`:
model source, upcycling on the fly, router coefficients, capacity, expert dropout, what trains, LoRA,
dense control), the data (`DataArguments`) and TRL's `SFTConfig` (`MoeSFTConfig`: training, evaluation, checkpoints,
logging, ``max_length``, ``packing``); unknown keys or flags are errors.

Text data trains on every token; instruction data (``prompt_column`` + ``response_column``) on the
response only. Each evaluation scores the validation data and a fixed training subset in evaluation
mode; `MoeCallback` logs the task loss without the router terms, perplexity, the gap and the routing.
"""

import sys

import hf_moe.training  # noqa: F401  (before trl: a missing [train] extra is named in one line)

# isort: split
from transformers import AutoModelForCausalLM, AutoTokenizer, EarlyStoppingCallback
from trl import TrlParser

from hf_moe.training import (
    CompleteCheckpoints,
    DataArguments,
    MoeArguments,
    MoeCallback,
    MoeSFTConfig,
    MoeSFTTrainer,
    add_training_subset,
    check_process_group,
    finish_run,
    fit_length_to_positions,
    load_model_for_finetuning,
    load_train_and_validation,
    prepare_run,
    run_recipe_main,
    select_trainable_parameters,
    to_sft_columns,
)


def main(argv: list[str] | None = None) -> dict:
    parser = TrlParser((MoeArguments, DataArguments, MoeSFTConfig))
    moe_args, data_args, training_args = parser.parse_args_and_config(sys.argv[1:] if argv is None else argv)
    run = prepare_run(moe_args, training_args)

    tokenizer = AutoTokenizer.from_pretrained(moe_args.tokenizer_name_or_path or moe_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with training_args.main_process_first():
        data = to_sft_columns(load_train_and_validation(data_args, training_args.seed), data_args)

    model = load_model_for_finetuning(moe_args, AutoModelForCausalLM, pad_token_id=tokenizer.pad_token_id)
    training_args.max_length = fit_length_to_positions(model, training_args.max_length, "max_length")
    if not moe_args.dense_control or moe_args.train_parameters == "lora":
        model = select_trainable_parameters(model, moe_args)

    callbacks = [CompleteCheckpoints()]
    if moe_args.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(moe_args.early_stopping_patience, moe_args.early_stopping_threshold))
    trainer = MoeSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset={"validation": data["validation"]},
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    add_training_subset(trainer, moe_args.train_eval_samples)
    MoeCallback.attach(trainer)
    check_process_group(trainer.accelerator)
    print(
        f"{trainer.accelerator.num_processes} process(es), {trainer.accelerator.distributed_type.value}, "
        f"mixed precision {trainer.accelerator.mixed_precision}, {'dense control' if moe_args.dense_control else 'MoE'}"
        + (
            f", sharded at load time {moe_args.distributed_config}"
            if trainer.is_distributed_loading_by_transformers
            else ""
        )
    )
    trainer.train(resume_from_checkpoint=run.checkpoint)
    return finish_run(
        trainer,
        tokenizer,
        moe_args,
        data_args,
        task="causal-lm",
        auto_class="AutoModelForCausalLM",
        metric_names=["loss", "perplexity"],
        run=run,
    )


if __name__ == "__main__":
    sys.exit(run_recipe_main(main))
