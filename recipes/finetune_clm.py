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
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser

from hf_moe.training import (
    DataArguments,
    MoeArguments,
    MoeSFTConfig,
    MoeSFTTrainer,
    finish_run,
    load_model,
    load_sft_dataset,
    prepare_run,
    prepare_trainer,
    run_recipe_main,
)


def main(argv: list[str] | None = None) -> dict:
    parser = TrlParser((MoeArguments, DataArguments, MoeSFTConfig))
    moe_args, data_args, training_args = parser.parse_args_and_config(sys.argv[1:] if argv is None else argv)
    # The output folder (a finished run is replaced only when asked), the checkpoint to resume from,
    # max_length capped at the model's positions.
    run = prepare_run(moe_args, data_args, training_args)

    tokenizer = AutoTokenizer.from_pretrained(moe_args.tokenizer_name_or_path or moe_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with training_args.main_process_first():
        data = load_sft_dataset(data_args, training_args.seed)
    # An hf_moe checkpoint, or a dense one upcycled on the fly; then what trains (all, non_moe, routers, LoRA).
    model = load_model(moe_args, AutoModelForCausalLM, pad_token_id=tokenizer.pad_token_id)

    trainer = MoeSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset={"validation": data["validation"]},
        processing_class=tokenizer,
    )
    # MoeCallback, a training subset scored for the gap, complete checkpoints, early stopping.
    prepare_trainer(trainer, run)
    trainer.train(resume_from_checkpoint=run.checkpoint)

    # The model (or adapter), its settings and model card, in place of any run it replaces; pushed if asked.
    return finish_run(trainer, run, task="causal-lm", metric_names=["loss", "perplexity"])


if __name__ == "__main__":
    sys.exit(run_recipe_main(main))
