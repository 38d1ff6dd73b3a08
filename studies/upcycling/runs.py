"""The study's runs: one function per kind of run, each training through a recipe's ``main(argv)`` in this process.

Every recipe option the study sets is written in one place, `recipe_argv`: the study describes a model with `Moe`
(its own names) and the training with the trainer's own argument names.
"""

import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from recipes import finetune_classification, finetune_clm

from .data import StudyData

FINISHED = "finetune_config.yaml"  # written last by a recipe run
RUN_SECONDS = "study_seconds.txt"  # wall time of the whole run (loading, training, evaluations, saving)


@dataclass(frozen=True)
class Moe:
    """What a run trains, in the study's terms. ``None``: the recipe's default. ``dense``: the dense control (the
    dense start fine-tuned as it is; the MoE fields are still passed, and ignored)."""

    routing: str = "switch"
    experts: int = 8
    top_k: int | None = 2
    norm_topk_prob: bool | None = True
    layers: str = "every_other"
    capacity: str = "1.25"
    z_loss: float = 1e-3
    aux_loss: float | None = 0.01
    expert_dropout: float | None = 0.0
    backbone_dropout: float | None = 0.0
    train_parameters: str | None = None
    dense: bool = False
    seed: int = 0


SWITCH = Moe()
EXPERT_CHOICE = Moe(
    routing="expert_choice",
    top_k=None,
    norm_topk_prob=None,
    capacity="2.0",
    aux_loss=None,
    expert_dropout=None,
    backbone_dropout=None,
)


def recipe_argv(model: str, moe: Moe, data: dict, training: dict) -> list[str]:
    """The recipe's command line for one run: the model source, ``moe`` as hf_moe's options, the data options
    (``train_file``, ``validation_file``, ``text_column``, ``label_column``) and the trainer's arguments. The only
    place that names hf_moe's recipe options."""
    options = {
        "model_name_or_path": model,
        "upcycle_routing": moe.routing,
        "upcycle_num_experts": moe.experts,
        "upcycle_moe_layers": moe.layers,
        "upcycle_num_experts_per_tok": moe.top_k,
        "upcycle_norm_topk_prob": moe.norm_topk_prob,
        "upcycle_seed": moe.seed,
        "router_aux_loss_coef": moe.aux_loss,
        "router_z_loss_coef": moe.z_loss,
        "expert_dropout": moe.expert_dropout,
        "backbone_dropout": moe.backbone_dropout,
        "capacity_factor": moe.capacity,
        "train_parameters": moe.train_parameters,
        "dense_control": True if moe.dense else None,
        **data,
        **training,
    }
    argv = []
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


class Runs:
    """The runs of one study under ``output/runs``; a finished run is reused, an interrupted one started again."""

    def __init__(self, output: Path, size: dict, data: StudyData):
        self.output = output
        self.size = size
        self.data = data
        self.folder = output / "runs"
        self.dense_init = output / "dense_init"
        self.dense = self.folder / "pretrain_dense"  # the dense start every comparison fine-tunes

    def run(self, recipe, folder: Path, argv: list[str]) -> Path:
        if (folder / FINISHED).is_file():
            print(f"[study] reusing {folder.relative_to(self.output)}")
            return folder
        if folder.exists():  # an interrupted run: start it again
            shutil.rmtree(folder)
        started = time.time()
        print(f"[study] training {folder.relative_to(self.output)}", flush=True)
        recipe.main(argv + ["--output_dir", str(folder)])
        (folder / RUN_SECONDS).write_text(f"{time.time() - started:.1f}\n")
        return folder

    def clm(self, folder: Path, moe: Moe, steps: int, model: Path | None = None, **training) -> Path:
        """A causal-LM run from the dense start: constant learning rate after warm-up, evaluations from step 0."""
        s = self.size
        data = {
            "train_file": str(self.data.folder / "train.jsonl"),
            "validation_file": str(self.data.folder / "validation.jsonl"),
            "text_column": "text",
        }
        settings = {
            "max_length": s["block"],
            "packing": True,
            "packing_strategy": "wrapped",
            "per_device_train_batch_size": s["batch"],
            "per_device_eval_batch_size": 64,
            "learning_rate": 1e-3,
            "lr_scheduler_type": "constant_with_warmup",
            "warmup_steps": 5,
            "weight_decay": 0.01,
            "max_steps": steps,
            "eval_strategy": "steps",
            "eval_steps": s["eval_steps"],
            "eval_on_start": True,
            "save_strategy": "no",
            "logging_steps": s["logging_steps"],
            "train_eval_samples": s["train_eval_samples"],
            "report_to": "none",
            "disable_tqdm": True,
            "use_cpu": True,
            "bf16": False,
            "seed": moe.seed,
            **training,
        }
        return self.run(finetune_clm, folder, recipe_argv(str(model or self.dense), moe, data, settings))

    def pretrain(self) -> None:
        """The dense start: a small llama initialised here and pre-trained through the CLM recipe (dense control)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        s, tokenizer = self.size, self.data.tokenizer
        if not (self.dense_init / "config.json").is_file():
            config = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=s["hidden_size"],
                intermediate_size=3 * s["hidden_size"],
                num_hidden_layers=s["layers"],
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=256,
                tie_word_embeddings=True,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=None,
            )
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(self.dense_init)
            tokenizer.save_pretrained(self.dense_init)
        self.clm(
            self.folder / "pretrain_dense",
            replace(SWITCH, dense=True),
            s["pretrain_steps"],
            model=self.dense_init,
            learning_rate=3e-3,
            lr_scheduler_type="cosine",
            warmup_steps=10,
            eval_steps=s["pretrain_steps"],
            eval_on_start=False,
            train_eval_samples=0,
        )

    def upcycling(self, seed: int) -> None:
        """Section 1 (and 3): the dense continuation (longer, read at equal steps / FLOPs / time), the upcycled
        Switch MoE, and the same MoE without z-loss."""
        s = self.size
        folder = self.folder / "upcycling"
        dense_steps = math.ceil(s["steps"] * s["dense_steps_factor"] / s["eval_steps"]) * s["eval_steps"]
        moe = replace(SWITCH, seed=seed)
        self.clm(folder / f"dense_s{seed}", replace(moe, dense=True), dense_steps)
        self.clm(folder / f"switch_s{seed}", moe, s["steps"])
        self.clm(folder / f"switch_zloss0_s{seed}", replace(moe, z_loss=0.0), s["steps"])

    def zloss_high_lr(self) -> None:
        """Section 3's stress pair: z-loss 0 and 1e-3 at ten times the learning rate, one seed."""
        s = self.size
        for name, coef in (("switch_zloss0", 0.0), ("switch", 1e-3)):
            folder = self.folder / "zloss_high_lr" / f"{name}_lr{s['stress_lr']:g}"
            self.clm(folder, replace(SWITCH, z_loss=coef), s["steps"], learning_rate=s["stress_lr"])

    def overfitting(self, seed: int) -> None:
        """Section 2: sequence classification for many epochs; dense, MoE, expert dropout, non-MoE training."""
        s = self.size
        steps_per_epoch = math.ceil(s["classes"] * s["train_per_class"] / s["cls_batch"])
        data = {
            "train_file": str(self.data.folder / "cls_train.jsonl"),
            "validation_file": str(self.data.folder / "cls_validation.jsonl"),
            "text_column": "text",
            "label_column": "label",
        }
        training = {
            "max_length": 64,
            "per_device_train_batch_size": s["cls_batch"],
            "per_device_eval_batch_size": 64,
            "learning_rate": 1e-3,
            "lr_scheduler_type": "linear",
            "warmup_steps": 5,
            "weight_decay": 0.01,
            "num_train_epochs": s["epochs"],
            "eval_strategy": "steps",
            "eval_steps": max(1, steps_per_epoch // 2),
            "eval_on_start": True,
            "save_strategy": "no",
            "logging_steps": max(1, steps_per_epoch // 2),
            "train_eval_samples": s["train_eval_samples"],
            "report_to": "none",
            "disable_tqdm": True,
            "use_cpu": True,
            "seed": seed,
        }
        moe = replace(SWITCH, seed=seed, backbone_dropout=0.1)
        for name, variant in overfitting_variants(moe).items():
            folder = self.folder / "overfitting" / f"{name}_s{seed}"
            self.run(finetune_classification, folder, recipe_argv(str(self.dense), variant, data, training))

    def expert_choice(self) -> Path:
        """Section 4: the dense start upcycled into Expert Choice (c = 2), with checkpoints to score."""
        s = self.size
        return self.clm(
            self.folder / "expert_choice" / "expert_choice_c2_s0",
            EXPERT_CHOICE,
            s["ec_steps"],
            save_strategy="steps",
            save_steps=s["ec_save_steps"],
            eval_steps=s["ec_save_steps"],
        )

    @torch.no_grad()
    def validation_loss(self, model) -> float:
        model.eval()
        blocks = self.data.validation_blocks
        total = sum(model(input_ids=b, labels=b).loss.item() * len(b) for b in blocks.split(64))
        return total / len(blocks)

    def score_expert_choice(self, folder: Path) -> list[dict]:
        """Validation loss of the upcycled model (step 0) and of every saved checkpoint, with each inference
        routing: ``threshold`` (causal, what generation uses) and ``expert_choice`` (as in training)."""
        from transformers import AutoModelForCausalLM, LlamaForCausalLM

        from hf_moe import upcycle_model

        cached = folder / "routing_scores.json"
        if cached.is_file():
            return json.loads(cached.read_text())
        rows = []
        dense = LlamaForCausalLM.from_pretrained(self.dense, dtype=torch.float32)
        upcycled = upcycle_model(
            dense,
            routing=EXPERT_CHOICE.routing,
            num_experts=EXPERT_CHOICE.experts,
            moe_layers=EXPERT_CHOICE.layers,
            capacity_factor=float(EXPERT_CHOICE.capacity),
            seed=EXPERT_CHOICE.seed,
        )
        sources = [(0, upcycled)]
        for checkpoint in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
            sources.append((int(checkpoint.name.split("-")[1]), checkpoint))
        for step, source in sources:
            row = {"step": step}
            for mode in ("threshold", "expert_choice"):
                if isinstance(source, Path):
                    model = AutoModelForCausalLM.from_pretrained(source, inference_routing=mode, dtype=torch.float32)
                else:
                    model = source
                    model.config.inference_routing = mode
                    for module in model.modules():
                        if hasattr(module, "inference_routing"):
                            module.inference_routing = mode
                row[mode] = self.validation_loss(model)
            rows.append(row)
        cached.write_text(json.dumps(rows, indent=1))
        return rows


def overfitting_variants(moe: Moe) -> dict[str, Moe]:
    """Section 2's models, by run name."""
    return {
        "dense": replace(moe, dense=True),
        "switch": moe,
        "switch_expert_dropout0.1": replace(moe, expert_dropout=0.1),
        "switch_expert_dropout0.4": replace(moe, expert_dropout=0.4),
        "switch_non_moe": replace(moe, train_parameters="non_moe"),
    }
