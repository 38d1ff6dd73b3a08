"""The study's runs: `plan` lists every run (a pure function of the sizes), `Runs` trains them through the recipes'
``main(argv)`` in this process and scores what the recipes do not (the test split, router logits, Expert Choice's
inference routings).

Every recipe option the study sets is written in one place, `recipe_argv`: the study describes a model with `Moe`
(its own names) and the training with the trainer's own argument names.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from recipes import finetune_classification, finetune_clm

from .data import StudyData

FINISHED = "finetune_config.yaml"  # written last by a recipe run
RUN_SECONDS = "study_seconds.txt"  # wall time of the whole run (loading, training, evaluations, saving)
RUN_CODE = "study_code.json"  # the digests of the source files loaded when the run was trained and scored
SCORES = "study_scores.json"  # what the study scored on the run's checkpoints (cached; the checkpoints are removed)
TORCHRUN_LOG = "torchrun.log"  # the output of a data-parallel run's processes


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
    granularity: int = 1
    shared_expert: bool = False
    balance_scope: str | None = None
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
        "upcycle": json.dumps(
            {
                "routing": moe.routing,
                "num_experts": moe.experts,
                "moe_layers": moe.layers,
                "granularity": moe.granularity,
                "shared_expert": moe.shared_expert,
                "seed": moe.seed,
            }
        ),
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob,
        "router_aux_loss_coef": moe.aux_loss,
        "router_z_loss_coef": moe.z_loss,
        "balance_scope": moe.balance_scope,
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


@dataclass(frozen=True)
class RunSpec:
    """One planned run: its folder under ``runs/``, the recipe, the dense start it fine-tunes (``pretrain``: the
    start's initialisation), the model, the trainer's arguments and the data-parallel processes it trains on
    (``processes`` > 1: ``torchrun`` on CPU with gloo, each process taking its share of the batch)."""

    folder: str
    recipe: str  # "clm" or "classification"
    start: int
    moe: Moe
    training: dict = field(hash=False)
    pretrain: bool = False
    processes: int = 1


def dense_steps(size: dict) -> int:
    """The dense continuation's steps: ``dense_steps_factor`` x the MoE's, rounded up to a whole evaluation."""
    return math.ceil(size["steps"] * size["dense_steps_factor"] / size["eval_steps"]) * size["eval_steps"]


def clm_training(size: dict, seed: int, steps: int, **extra) -> dict:
    """Causal-LM fine-tuning: constant learning rate after warm-up (so an intermediate evaluation is a fair "stop
    here"), evaluations from step 0, a model-only checkpoint at each evaluation (scored on the test split)."""
    return {
        "max_length": size["block"],
        "packing": True,
        "packing_strategy": "wrapped",
        "per_device_train_batch_size": size["batch"],
        "per_device_eval_batch_size": 64,
        "learning_rate": size["learning_rate"],
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 5,
        "weight_decay": 0.01,
        "max_steps": steps,
        "eval_strategy": "steps",
        "eval_steps": size["eval_steps"],
        "eval_on_start": True,
        "save_strategy": "steps",
        "save_steps": size["eval_steps"],
        "save_only_model": True,
        "logging_steps": size["logging_steps"],
        "train_eval_samples": size["train_eval_samples"],
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": size["use_cpu"],
        "bf16": size["bf16"],
        "seed": seed,
        **extra,
    }


def classification_training(size: dict, seed: int) -> dict:
    """Sequence classification for many epochs (linear decay), evaluated and saved twice an epoch."""
    steps_per_epoch = math.ceil(size["classes"] * size["train_per_class"] / size["cls_batch"])
    every = max(1, steps_per_epoch // 2)
    return {
        "max_length": size["cls_max_length"],
        "per_device_train_batch_size": size["cls_batch"],
        "per_device_eval_batch_size": 64,
        "learning_rate": size["cls_lr"],
        "lr_scheduler_type": "linear",
        "warmup_steps": 5,
        "weight_decay": 0.01,
        "num_train_epochs": size["epochs"],
        "eval_strategy": "steps",
        "eval_steps": every,
        "eval_on_start": True,
        "save_strategy": "steps",
        "save_steps": every,
        "save_only_model": True,
        "logging_steps": every,
        "train_eval_samples": size["train_eval_samples"],
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": size["use_cpu"],
        "bf16": size["bf16"],
        "seed": seed,
    }


# Section 2's models (all with dropout 0.1 outside the experts), by run name: expert dropout 0 / 0.1 / 0.2 / 0.4
# (Switch Transformer Table 4 recommends 0.4) and what trains (ST-MoE section 4.1: all, non-MoE only, routers only).
OVERFITTING = {
    "dense": {"dense": True},
    "switch": {},
    "expert_dropout0.1": {"expert_dropout": 0.1},
    "expert_dropout0.2": {"expert_dropout": 0.2},
    "expert_dropout0.4": {"expert_dropout": 0.4},
    "train_non_moe": {"train_parameters": "non_moe"},
    "train_routers": {"train_parameters": "routers"},
}
# The sweeps: each changes one setting of section 1's MoE (start 0, ``sweep_seeds`` seeds); the learning-rate sweep
# changes the dense continuation too. Top-1 uses Switch's unrenormalised gate (renormalised top-1 gates are 1, and the
# router would get no gradient from the task loss).
SWEEPS = {
    "top1": {"top_k": 1, "norm_topk_prob": False},
    "experts4": {"experts": 4},
    "experts16": {"experts": 16},
    "capacity1.0": {"capacity": "1.0"},
    "capacity2.0": {"capacity": "2.0"},
    "dropless": {"capacity": "dropless"},
    "every_layer": {"layers": "all"},
}
# Balancing over each process's micro-batch vs over the global batch (Qiu et al. 2025, arXiv 2501.11873): both on
# 2 data-parallel processes (torchrun, gloo), each taking half of section 1's batch, so the global batch and the
# schedule are section 1's; in one process the two scopes count the same tokens.
BALANCE_SCOPES = {"processes2_micro_batch": "micro_batch", "processes2_global_batch": "global_batch"}
DATA_PARALLEL = 2
# The upcycling modes, each against section 1's plain upcycling (8 whole experts, top-2, balancing loss 1e-2) at
# equal active parameters: fine-grained experts (He et al. 2024: E x G experts of width I/G, top-(2G)); a shared
# expert holding the whole dense FFN next to top-1 routed experts (2 FFN widths per token, as top-2; Qwen2-MoE's
# ungated form and raw top-1 gate, so the router learns from the task loss); auxiliary-loss-free balancing (Wang et
# al. 2024: selection biases, no balancing loss) and, as its control, the same top-2 router with no balancing at all.
# Every mode keeps the capacity factor 1.25, so an imbalance shows as dropped pairs.
MODES = {
    "granularity2": {"granularity": 2},
    "granularity4": {"granularity": 4},
    "shared_expert_top1": {"shared_expert": True, "top_k": 1, "norm_topk_prob": False},
    "aux_free": {"routing": "aux_free", "aux_loss": 0.0},
    "no_balancing": {"aux_loss": 0.0},
}


def plan(size: dict) -> list[RunSpec]:
    """Every run of the study, in the order they train: one seed of everything first, so an interrupted study
    already has every section."""
    s, runs = size, []

    def lm(folder: str, start: int, moe: Moe, steps: int, processes: int = 1, **extra) -> None:
        runs.append(RunSpec(folder, "clm", start, moe, clm_training(s, moe.seed, steps, **extra), processes=processes))

    for start in range(s["starts"]):
        training = clm_training(s, start, s["pretrain_steps"], learning_rate=s["pretrain_lr"])
        del training["save_steps"], training["save_only_model"]
        training.update(lr_scheduler_type="cosine", warmup_steps=10, eval_steps=s["pretrain_steps"])
        training.update(eval_on_start=False, train_eval_samples=0, save_strategy="no")
        dense = replace(SWITCH, dense=True, seed=start)
        runs.append(RunSpec(f"pretrain/start{start}", "clm", start, dense, training, pretrain=True))
    for seed in range(max(s["seeds"], s["ec_seeds"], s["cls_seeds"], s["sweep_seeds"])):
        moe = replace(SWITCH, seed=seed)
        for start in range(s["starts"]):
            if seed < s["seeds"]:
                lm(f"upcycling/start{start}/dense_s{seed}", start, replace(moe, dense=True), dense_steps(s))
                lm(f"upcycling/start{start}/switch_s{seed}", start, moe, s["steps"])
                lm(f"upcycling/start{start}/switch_zloss0_s{seed}", start, replace(moe, z_loss=0.0), s["steps"])
            if seed < s["ec_seeds"]:
                ec = replace(EXPERT_CHOICE, seed=seed)
                lm(f"expert_choice/start{start}/expert_choice_c2_s{seed}", start, ec, s["ec_steps"])
        if seed < s["cls_seeds"]:
            for name, change in OVERFITTING.items():
                variant = replace(moe, backbone_dropout=0.1, **change)
                training = classification_training(s, seed)
                runs.append(RunSpec(f"overfitting/{name}_s{seed}", "classification", 0, variant, training))
        if seed < s["sweep_seeds"]:
            for name, change in SWEEPS.items():
                lm(f"sweeps/{name}_s{seed}", 0, replace(moe, **change), s["steps"])
            for name, change in MODES.items():
                lm(f"modes/{name}_s{seed}", 0, replace(moe, **change), s["steps"])
            for name, scope in BALANCE_SCOPES.items():
                batch = s["batch"] // DATA_PARALLEL
                scoped = replace(moe, balance_scope=scope)
                lm(f"sweeps/{name}_s{seed}", 0, scoped, s["steps"], DATA_PARALLEL, per_device_train_batch_size=batch)
            for factor in s["lr_factors"]:
                if factor != 1.0:  # x1: section 1's runs
                    lr = s["learning_rate"] * factor
                    lm(
                        f"sweeps/dense_lr{factor:g}_s{seed}",
                        0,
                        replace(moe, dense=True),
                        dense_steps(s),
                        learning_rate=lr,
                    )
                    lm(f"sweeps/switch_lr{factor:g}_s{seed}", 0, moe, s["steps"], learning_rate=lr)
            for name, coef in (("switch", 1e-3), ("switch_zloss0", 0.0)):
                lm(
                    f"zloss_high_lr/{name}_s{seed}",
                    0,
                    replace(moe, z_loss=coef),
                    s["steps"],
                    learning_rate=s["stress_lr"],
                )
    return runs


def configuration(size: dict) -> dict:
    """The resolved configuration a report records: the sizes and every run's recipe command line (behind
    ``torchrun --nproc_per_node=N`` for a data-parallel run), with the study folder written as ``<output>``."""
    runs = {}
    for spec in plan(size):
        launcher = [] if spec.processes == 1 else ["torchrun", f"--nproc_per_node={spec.processes}"]
        runs[spec.folder] = launcher + spec_argv(spec, Path("<output>"))
    return {"sizes": size, "runs": runs}


def spec_argv(spec: RunSpec, output: Path) -> list[str]:
    data = output / "data"
    if spec.recipe == "clm":
        files = {
            "train_file": data / "train.jsonl",
            "validation_file": data / "validation.jsonl",
            "text_column": "text",
        }
    else:
        files = {
            "train_file": data / "cls_train.jsonl",
            "validation_file": data / "cls_validation.jsonl",
            "text_column": "text",
            "label_column": "label",
        }
    files = {k: str(v) for k, v in files.items()}
    model = output / ("dense_init" if spec.pretrain else "runs/pretrain") / f"start{spec.start}"
    return recipe_argv(str(model), spec.moe, files, spec.training) + [
        "--output_dir",
        str(output / "runs" / spec.folder),
    ]


def data_parallel(script: str, processes: int, argv: list[str], log: Path) -> None:
    """Run a recipe on ``processes`` CPU processes (``torchrun --standalone``: gloo, one torch thread each, the
    command recipes/README.md gives), from the repository root; its output goes to ``log``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(command + [script, *argv], cwd=root, env=environment, capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun {Path(script).name} failed (exit {result.returncode}); its output: {log}")


class Runs:
    """The runs of one study under ``output/runs``; a finished run is reused, an interrupted one started again."""

    def __init__(self, output: Path, size: dict, data: StudyData):
        self.output = output
        self.size = size
        self.data = data
        self.folder = output / "runs"
        self.plan = {spec.folder: spec for spec in plan(size)}

    def dense_start(self, start: int) -> Path:
        return self.folder / "pretrain" / f"start{start}"

    def initialise(self, start: int) -> None:
        """Dense start ``start`` before pre-training: a small llama, initialised with seed ``start``."""
        from transformers import LlamaConfig, LlamaForCausalLM

        s, tokenizer = self.size, self.data.tokenizer
        folder = self.output / "dense_init" / f"start{start}"
        if (folder / "config.json").is_file():
            return
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=s["hidden_size"],
            intermediate_size=s["intermediate_size"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["heads"],
            max_position_embeddings=max(256, s["block"], s["cls_max_length"]),
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
        torch.manual_seed(start)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    def train(self, spec: RunSpec) -> Path:
        folder = self.folder / spec.folder
        if (folder / FINISHED).is_file():
            print(f"[study] reusing {spec.folder}")
            return folder
        if folder.exists():  # an interrupted run: start it again
            shutil.rmtree(folder)
        if spec.pretrain:
            self.initialise(spec.start)
        recipe = finetune_clm if spec.recipe == "clm" else finetune_classification
        started = time.time()
        print(f"[study] training {spec.folder}", flush=True)
        if spec.processes == 1:
            recipe.main(spec_argv(spec, self.output))
        else:
            data_parallel(recipe.__file__, spec.processes, spec_argv(spec, self.output), folder / TORCHRUN_LOG)
        (folder / RUN_SECONDS).write_text(f"{time.time() - started:.1f}\n")
        return folder

    def train_all(self) -> None:
        from .provenance import file_digests, loaded_sources

        for spec in self.plan.values():
            folder = self.folder / spec.folder
            if (folder / RUN_CODE).is_file():
                print(f"[study] reusing {spec.folder}")
                continue
            self.train(spec)
            if not spec.pretrain:
                self.scores(spec.folder)
            (folder / RUN_CODE).write_text(json.dumps(file_digests(loaded_sources()), indent=1))

    def run_digests(self) -> list[dict[str, str]]:
        return [json.loads(p.read_text()) for p in sorted(self.folder.glob(f"**/{RUN_CODE}"))]

    def finished(self, folder: str) -> bool:
        return (self.folder / folder / FINISHED).is_file()

    # ---- scoring -----------------------------------------------------------------------------------------
    def scores(self, folder: str) -> dict:
        """What the study measures on a finished run's checkpoints and final model, computed once and cached in
        the run folder (the checkpoints are removed afterwards): causal LMs the test loss at every checkpoint and
        the router logit statistics of the final model on the test split; classifiers the test loss and accuracy
        at every checkpoint; Expert Choice both inference routings at every checkpoint."""
        from . import measures

        run = self.folder / folder
        cached = run / SCORES
        if cached.is_file():
            return json.loads(cached.read_text())
        spec = self.plan[folder]
        checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        device = "cpu" if self.size["use_cpu"] else "cuda"
        if spec.recipe == "classification":
            result = {
                "test": measures.classification_scores(checkpoints, run, self.data, device, self.size["cls_max_length"])
            }
        else:
            result = {"test_loss": measures.lm_test_losses(checkpoints, run, self.data.test_blocks, device)}
            if not spec.moe.dense:
                result["router"] = measures.router_statistics(run, self.data.test_blocks, device)
            if spec.moe.routing == "expert_choice":
                upcycled = measures.upcycled(self.dense_start(spec.start), spec.moe)
                result["inference_routing"] = measures.inference_routing_losses(
                    [(0, upcycled)] + [(int(c.name.split("-")[1]), c) for c in checkpoints],
                    self.data.test_blocks,
                    device,
                )
        cached.write_text(json.dumps(result, indent=1))
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint)
        return result
