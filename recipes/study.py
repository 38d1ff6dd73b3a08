"""Study: does upcycling pay off, and do the regularisers do what the papers say? Dense controls, seeds, plots.

    python recipes/study.py --output_dir hf_moe_study            # full study, about 25 minutes on 2 idle cores
    python recipes/study.py --output_dir /tmp/study --quick      # pipeline check, under 2 minutes

Offline, on CPU, on the Python standard library's own sources (as ``recipes/demo.py``). Every model
trains through the recipes (``finetune_clm.main`` / ``finetune_classification.main``, run in this
process); the study only prepares data, scores saved checkpoints and writes the report
(``report/README.md``, tables and PNG plots, the per-section overlays made with `hf_moe.compare`).

0. A small dense llama LM is pre-trained on the training files (the CLM recipe's dense control).
1. Upcycling vs dense continuation: the upcycled Switch MoE (8 experts, renormalised top-2, every
   other layer) and the dense model, fine-tuned from the same start on the same data and schedule
   (constant learning rate after warm-up, so an intermediate evaluation is a fair "stop here"), for
   several seeds. Compared at equal steps and at equal compute: the dense run goes on for longer and
   is read at the MoE's measured training time and at its training FLOPs.
2. Overfitting regime: classify source snippets by the module they come from, with a small training
   set for many epochs. Dense, upcycled MoE, expert dropout 0.1 / 0.4, and training only the
   non-MoE parameters (ST-MoE's fine-tuning recommendation). Train/validation curves and gap.
3. Router z-loss 0 vs 1e-3 (the runs of 1 with the coefficient set to 0, and one pair at a high
   learning rate): quality, router logit magnitude (RMS of the logsumexp, the z-loss's square
   root), loss spikes and gradient norm.
4. Expert Choice: the upcycled model's saved checkpoints scored with causal threshold routing and
   with training-mode (non-causal, whole-sequence) routing, against the training length.

An interrupted study resumes: running the command again reuses the finished runs. A finished study
(its report written) is kept unless ``--overwrite``, which starts over.
"""

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import sysconfig
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

RECIPES = Path(__file__).resolve().parent
sys.path.insert(0, str(RECIPES.parent))
sys.path.insert(0, str(RECIPES))

import finetune_classification  # noqa: E402
import finetune_clm  # noqa: E402
from demo import collect_stdlib_sources, pack, train_tokenizer  # noqa: E402

from hf_moe.compare import compare_runs, load_run, parameter_counts  # noqa: E402
from hf_moe.plotting import pyplot  # noqa: E402

REPORT = "README.md"
FINISHED = "finetune_config.yaml"  # written last by a recipe run
RUN_SECONDS = "study_seconds.txt"  # wall time of the whole run (loading, training, evaluations, saving)

# Sizes. Full: about 25 minutes on 2 idle cores (an hour on a busy shared one); quick: under 2 minutes.
FULL = {
    "train_chars": 1_500_000,
    "validation_chars": 60_000,
    "vocab_size": 1024,
    "hidden_size": 128,
    "layers": 4,
    "block": 64,
    "batch": 32,
    "pretrain_steps": 300,
    "steps": 100,
    "dense_steps_factor": 1.6,
    "eval_steps": 25,
    "logging_steps": 5,
    "train_eval_samples": 48,
    "seeds": 3,
    "classes": 6,
    "train_per_class": 32,
    "validation_per_class": 32,
    "epochs": 10,
    "cls_batch": 16,
    "cls_seeds": 2,
    "ec_steps": 160,
    "ec_save_steps": 40,
    "stress_lr": 1e-2,
}
QUICK = {
    **FULL,
    "train_chars": 60_000,
    "validation_chars": 8_000,
    "vocab_size": 300,
    "hidden_size": 32,
    "layers": 2,
    "block": 32,
    "batch": 8,
    "pretrain_steps": 10,
    "steps": 6,
    "eval_steps": 3,
    "logging_steps": 1,
    "train_eval_samples": 16,
    "seeds": 2,
    "classes": 3,
    "train_per_class": 8,
    "validation_per_class": 4,
    "epochs": 2,
    "cls_batch": 8,
    "cls_seeds": 1,
    "ec_steps": 6,
    "ec_save_steps": 3,
}


def flags(settings: dict) -> list[str]:
    argv = []
    for key, value in settings.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def chunks(text: str, size: int) -> list[str]:
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        if len(current) >= size:
            pieces.append(current)
            current = ""
    return pieces + ([current] if current.strip() else [])


class Study:
    def __init__(self, output: Path, size: dict):
        self.output = output
        self.size = size
        self.data = output / "data"
        self.runs = output / "runs"
        self.report = output / "report"
        self.dense = self.runs / "pretrain_dense"  # the dense start every comparison fine-tunes

    # ---- data -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        s = self.size
        train, validation = collect_stdlib_sources(s["train_chars"], s["validation_chars"])
        # Training files cut into pieces of about 1,500 characters at line ends, so that the training subset scored
        # for the gap (train_eval_samples) spans many files rather than the blocks of one or two whole files.
        train = [piece for text in train for piece in chunks(text, 1500)]
        for name, texts in (("train", train), ("validation", validation)):
            with open(self.data / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        init = self.output / "dense_init"
        if (init / "tokenizer.json").is_file():  # a resumed study: the tokenizer its runs use
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(init)
        else:
            self.tokenizer = train_tokenizer(train, s["vocab_size"])
        self.validation_blocks = pack(validation, self.tokenizer, s["block"])
        self.classification_data()

    def classification_data(self) -> None:
        """Snippets of six consecutive non-blank lines of the largest top-level standard library modules,
        labelled by module; training and validation snippets are disjoint, drawn from the same files."""
        s = self.size
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        modules = sorted(stdlib.glob("*.py"), key=lambda p: (-p.stat().st_size, p.name))[: s["classes"]]
        rng = random.Random(0)
        rows = {"train": [], "validation": []}
        for path in modules:
            lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
            snippets = ["\n".join(lines[i : i + 6]) for i in range(0, len(lines) - 5, 6)]
            rng.shuffle(snippets)
            n_train, n_val = s["train_per_class"], s["validation_per_class"]
            label = path.stem
            rows["train"] += [{"text": t, "label": label} for t in snippets[:n_train]]
            rows["validation"] += [{"text": t, "label": label} for t in snippets[n_train : n_train + n_val]]
        self.modules = [p.stem for p in modules]
        for name, items in rows.items():
            rng.shuffle(items)
            with open(self.data / f"cls_{name}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in items)

    # ---- runs -------------------------------------------------------------------------------
    def run(self, recipe, folder: Path, settings: dict) -> Path:
        if (folder / FINISHED).is_file():
            print(f"[study] reusing {folder.relative_to(self.output)}")
            return folder
        if folder.exists():  # an interrupted run: start it again
            shutil.rmtree(folder)
        started = time.time()
        print(f"[study] training {folder.relative_to(self.output)}", flush=True)
        recipe.main(flags({**settings, "output_dir": str(folder)}))
        (folder / RUN_SECONDS).write_text(f"{time.time() - started:.1f}\n")
        return folder

    def clm_settings(self, seed: int, steps: int, **extra) -> dict:
        s = self.size
        return {
            "model_name_or_path": str(self.dense),
            "train_file": str(self.data / "train.jsonl"),
            "validation_file": str(self.data / "validation.jsonl"),
            "text_column": "text",
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
            "seed": seed,
            **extra,
        }

    def switch(self, seed: int, **extra) -> dict:
        return {
            "upcycle_routing": "switch",
            "upcycle_num_experts": 8,
            "upcycle_moe_layers": "every_other",
            "upcycle_num_experts_per_tok": 2,
            "upcycle_norm_topk_prob": True,
            "upcycle_seed": seed,
            "router_aux_loss_coef": 0.01,
            "router_z_loss_coef": 1e-3,
            "expert_dropout": 0.0,
            "backbone_dropout": 0.0,
            "capacity_factor": "1.25",
            **extra,
        }

    def pretrain(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        s = self.size
        init = self.output / "dense_init"
        if not (init / "config.json").is_file():
            config = LlamaConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=s["hidden_size"],
                intermediate_size=3 * s["hidden_size"],
                num_hidden_layers=s["layers"],
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=256,
                tie_word_embeddings=True,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                bos_token_id=None,
            )
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(init)
            self.tokenizer.save_pretrained(init)
        self.dense = init
        settings = self.clm_settings(
            0,
            s["pretrain_steps"],
            learning_rate=3e-3,
            lr_scheduler_type="cosine",
            warmup_steps=10,
            eval_steps=s["pretrain_steps"],
            eval_on_start=False,
            train_eval_samples=0,
            **self.switch(0),
            dense_control=True,
        )
        self.dense = self.run(finetune_clm, self.runs / "pretrain_dense", settings)

    def upcycling_runs(self, seed: int) -> None:
        s = self.size
        folder = self.runs / "upcycling"
        dense_steps = math.ceil(s["steps"] * s["dense_steps_factor"] / s["eval_steps"]) * s["eval_steps"]
        self.run(
            finetune_clm,
            folder / f"dense_s{seed}",
            self.clm_settings(seed, dense_steps, **self.switch(seed), dense_control=True),
        )
        self.run(finetune_clm, folder / f"switch_s{seed}", self.clm_settings(seed, s["steps"], **self.switch(seed)))
        self.run(
            finetune_clm,
            folder / f"switch_zloss0_s{seed}",
            self.clm_settings(seed, s["steps"], **self.switch(seed, router_z_loss_coef=0.0)),
        )

    def stress_runs(self) -> None:
        s = self.size
        for name, coef in (("switch_zloss0", 0.0), ("switch", 1e-3)):
            settings = self.clm_settings(
                0, s["steps"], learning_rate=s["stress_lr"], **self.switch(0, router_z_loss_coef=coef)
            )
            self.run(finetune_clm, self.runs / "zloss_high_lr" / f"{name}_lr{s['stress_lr']:g}", settings)

    def classification_runs(self, seed: int) -> None:
        s = self.size
        steps_per_epoch = math.ceil(s["classes"] * s["train_per_class"] / s["cls_batch"])
        base = {
            "model_name_or_path": str(self.dense),
            "train_file": str(self.data / "cls_train.jsonl"),
            "validation_file": str(self.data / "cls_validation.jsonl"),
            "text_column": "text",
            "label_column": "label",
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
        variants = {
            "dense": {"dense_control": True},
            "switch": {},
            "switch_expert_dropout0.1": {"expert_dropout": 0.1},
            "switch_expert_dropout0.4": {"expert_dropout": 0.4},
            "switch_non_moe": {"train_parameters": "non_moe"},
        }
        for name, extra in variants.items():
            settings = {**base, **self.switch(seed, backbone_dropout=0.1), **extra}
            self.run(finetune_classification, self.runs / "overfitting" / f"{name}_s{seed}", settings)

    def expert_choice_run(self) -> Path:
        s = self.size
        settings = self.clm_settings(
            0,
            s["ec_steps"],
            upcycle_routing="expert_choice",
            upcycle_num_experts=8,
            upcycle_moe_layers="every_other",
            upcycle_seed=0,
            capacity_factor="2.0",
            router_z_loss_coef=1e-3,
            save_strategy="steps",
            save_steps=s["ec_save_steps"],
            eval_steps=s["ec_save_steps"],
        )
        return self.run(finetune_clm, self.runs / "expert_choice" / "expert_choice_c2_s0", settings)

    # ---- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, model) -> float:
        model.eval()
        blocks = self.validation_blocks
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
            dense, routing="expert_choice", num_experts=8, moe_layers="every_other", capacity_factor=2.0, seed=0
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


# ---- reading runs -------------------------------------------------------------------------------
def evaluations(run, key: str = "eval_validation_task_loss") -> list[tuple[int, float]]:
    return run.series(key)


def cumulative_seconds(run) -> list[tuple[int, float]]:
    """(step, training seconds up to it) from the logged mean step time of each logging window."""
    points, total, previous = [(0, 0.0)], 0.0, 0
    for step, seconds in run.series("step_seconds"):
        total += seconds * (step - previous)
        previous = step
        points.append((step, total))
    return points


def seconds_at(run, step: int) -> float | None:
    return interpolate(cumulative_seconds(run), step)


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def value_at_step(run, step: int, key: str = "eval_validation_task_loss") -> float | None:
    return next((v for s, v in run.series(key) if s == step), None)


def training_flops_per_token(run, block: int) -> float:
    """6 x (active parameters, with tied embeddings counted once as the LM head's matmul) plus attention's
    6 x layers x context x hidden (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1)."""
    _, active = parameter_counts(run)
    config = run.config.get("text_config", run.config)
    return 6 * active + 6 * config["num_hidden_layers"] * block * config["hidden_size"]


def last_balance(run) -> float | None:
    """Mean over MoE layers of the expert balance on the validation data at the last evaluation."""
    for row in reversed(run.log_history):
        values = [v for k, v in row.items() if k.startswith("eval_validation_router/") and k.endswith("/balance")]
        if values:
            return statistics.mean(values)
    return None


def mean_spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if all(float(v).is_integer() for v in values):
        return ", ".join(str(int(v)) for v in values)
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def loss_spikes(run, key: str = "task_loss", ratio: float = 1.1) -> int:
    """Logged training losses more than ``ratio`` times the lowest one logged before them."""
    best, spikes = math.inf, 0
    for _, value in run.series(key):
        spikes += value > ratio * best
        best = min(best, value)
    return spikes


def plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict, markers: bool = True) -> None:
    plt = pyplot("the study's figures")

    figure, axes = plt.subplots(figsize=(6, 3.8))
    for index, (label, (points, style, *colour)) in enumerate(series.items()):
        if points:
            colour = colour[0] if colour else f"C{index % 10}"
            axes.plot(*zip(*points, strict=True), style, color=colour, label=label, marker="." if markers else None)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---- the report ----------------------------------------------------------------------------------
def section_upcycling(study: Study, seeds: list[int], lines: list[str], results: dict) -> None:
    s = study.size
    folder = study.runs / "upcycling"
    report = study.report
    steps, by_seed = s["steps"], {}
    for seed in seeds:
        dense, moe = load_run(folder / f"dense_s{seed}"), load_run(folder / f"switch_s{seed}")
        moe_seconds, dense_clock = seconds_at(moe, steps), cumulative_seconds(dense)
        # Dense evaluation loss against its training seconds, read at the MoE's total training time.
        dense_by_time = [(interpolate(dense_clock, step), loss) for step, loss in evaluations(dense)]
        flops_ratio = training_flops_per_token(moe, s["block"]) / training_flops_per_token(dense, s["block"])
        by_seed[seed] = {
            "dense_start": value_at_step(dense, 0),
            "moe_step0": value_at_step(moe, 0),
            "moe": value_at_step(moe, steps),
            "dense_equal_steps": value_at_step(dense, steps),
            "dense_equal_flops": interpolate(evaluations(dense), steps * flops_ratio),
            "dense_equal_time": interpolate(dense_by_time, moe_seconds),
            "flops_ratio": flops_ratio,
            "time_ratio": moe_seconds / seconds_at(dense, steps),
            "moe_seconds_per_step": moe_seconds / steps,
            "dense_seconds_per_step": seconds_at(dense, steps) / steps,
            "moe_gap": value_at_step(moe, steps, "eval_validation_gap"),
            "dense_gap": value_at_step(dense, steps, "eval_validation_gap"),
        }
    results["upcycling"] = by_seed

    def column(key):
        return [by_seed[seed][key] for seed in seeds]

    def perplexity(key):
        return mean_spread([math.exp(v) for v in column(key) if v is not None])

    lines += [
        "## 1. Upcycling vs dense continuation",
        "",
        f"From the same pre-trained dense start, {s['steps']} steps of {s['batch']} x {s['block']} tokens, constant "
        "learning rate 1e-3 after 5 warm-up steps, no dropout; the MoE is the upcycled Switch model (8 experts, "
        "renormalised top-2, every other layer, capacity 1.25 in training, dropless evaluation, z-loss 1e-3, "
        f"balancing loss 1e-2). The dense control runs {s['dense_steps_factor']}x as many steps and is read at the "
        f"MoE's step count, at the MoE's training FLOPs and at the MoE's measured training time. Seeds {seeds} "
        "(data order and router initialisation); mean ± standard deviation over seeds. Validation task loss "
        "(nats/token, no router terms) and perplexity on held-out standard-library files.",
        "",
        "| | validation loss | validation perplexity |",
        "|---|---|---|",
        f"| dense start (step 0) | {mean_spread(column('dense_start'))} | {perplexity('dense_start')} |",
        f"| upcycled MoE, step 0 | {mean_spread(column('moe_step0'))} | {perplexity('moe_step0')} |",
        f"| upcycled MoE, step {s['steps']} | {mean_spread(column('moe'))} | {perplexity('moe')} |",
        f"| dense, equal steps ({s['steps']}) | {mean_spread(column('dense_equal_steps'))} | "
        f"{perplexity('dense_equal_steps')} |",
        f"| dense, equal training FLOPs (x{statistics.mean(column('flops_ratio')):.2f} steps) | "
        f"{mean_spread(column('dense_equal_flops'))} | {perplexity('dense_equal_flops')} |",
        f"| dense, equal measured training time | {mean_spread(column('dense_equal_time'))} | "
        f"{perplexity('dense_equal_time')} |",
        "",
    ]
    differences = {
        key: [by_seed[seed]["moe"] - by_seed[seed][key] for seed in seeds if by_seed[seed][key] is not None]
        for key in ("dense_equal_steps", "dense_equal_flops", "dense_equal_time")
    }
    results["upcycling_differences"] = differences
    lines += [
        "MoE minus dense validation loss, per seed (negative: the MoE is better): "
        + "; ".join(
            f"{k.removeprefix('dense_')}: " + ", ".join(f"{d:+.4f}" for d in v) for k, v in differences.items()
        ),
        "",
        f"Training time per step: MoE {mean_spread(column('moe_seconds_per_step'))} s, dense "
        f"{mean_spread(column('dense_seconds_per_step'))} s (wall clock of the optimizer step on a shared machine); "
        f"training FLOPs per token MoE / dense = {statistics.mean(column('flops_ratio')):.3f}.",
        "",
        "![validation loss against step and training time](upcycling_validation.png)",
        "",
    ]
    seed = seeds[0]
    dense, moe = load_run(folder / f"dense_s{seed}"), load_run(folder / f"switch_s{seed}")
    plot_series = {}
    for seed in seeds:
        dense, moe = load_run(folder / f"dense_s{seed}"), load_run(folder / f"switch_s{seed}")
        style = ("-", "--", ":", "-.")[seed % 4]
        plot_series[f"dense s{seed}"] = (evaluations(dense), style, "C0")
        plot_series[f"switch MoE s{seed}"] = (evaluations(moe), style, "C1")
    plot(
        report / "upcycling_validation.png",
        "Upcycling vs dense continuation",
        "optimizer step",
        "validation task loss",
        plot_series,
    )
    time_series = {}
    for seed in seeds:
        dense, moe = load_run(folder / f"dense_s{seed}"), load_run(folder / f"switch_s{seed}")
        for name, run, colour in (("dense", dense, "C0"), ("switch MoE", moe, "C1")):
            clock = cumulative_seconds(run)
            time_series[f"{name} s{seed}"] = (
                [(interpolate(clock, st), v) for st, v in evaluations(run) if interpolate(clock, st) is not None],
                ("-", "--", ":", "-.")[seed % 4],
                colour,
            )
    plot(
        report / "upcycling_time.png",
        "Validation loss against measured training time",
        "training seconds",
        "validation task loss",
        time_series,
    )
    lines += ["![validation loss against training time](upcycling_time.png)", ""]


def section_zloss(study: Study, seeds: list[int], lines: list[str], results: dict) -> None:
    folder = study.runs / "upcycling"
    steps = study.size["steps"]
    table = {}
    for name, label in (("switch", "z-loss 1e-3"), ("switch_zloss0", "z-loss 0")):
        runs = [load_run(folder / f"{name}_s{seed}") for seed in seeds]
        table[label] = {
            "validation loss": [value_at_step(r, steps) for r in runs],
            "router logit RMS logsumexp (eval)": [math.sqrt(r.last("eval_validation_z_loss")) for r in runs],
            "max grad norm": [max(v for _, v in r.series("grad_norm")) for r in runs],
            "loss spikes (>10% over running min)": [loss_spikes(r) for r in runs],
            "expert balance (last eval, mean over layers)": [last_balance(r) for r in runs],
        }
    stress = study.runs / "zloss_high_lr"
    lr = study.size["stress_lr"]
    stress_rows = {}
    for name, label in (("switch", "z-loss 1e-3"), ("switch_zloss0", "z-loss 0")):
        path = stress / f"{name}_lr{lr:g}"
        if (path / FINISHED).is_file():
            r = load_run(path)
            stress_rows[label] = {
                "validation loss": value_at_step(r, steps),
                "RMS logsumexp": math.sqrt(r.last("eval_validation_z_loss")),
                "max grad norm": max(v for _, v in r.series("grad_norm")),
                "spikes": loss_spikes(r),
            }
    results["zloss"] = table
    results["zloss_high_lr"] = stress_rows
    metrics = list(next(iter(table.values())))
    lines += [
        "## 3. Router z-loss 0 vs 1e-3",
        "",
        "The MoE runs of section 1, and the same settings with the z-loss coefficient set to 0 (same seeds). "
        "The router "
        "logit magnitude is the root of the logged z-loss, i.e. the RMS over tokens of logsumexp of the router logits "
        "(ST-MoE eq. 5), measured on the validation data at the last evaluation. A spike is a logged training loss "
        "more than 10% above the lowest one logged before it.",
        "",
        "| | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for label, values in table.items():
        lines.append(
            f"| {label} | "
            + " | ".join(mean_spread([float(v) for v in values[m] if v is not None]) for m in metrics)
            + " |"
        )
    lines.append("")
    if stress_rows:
        lines += [
            f"Stress test, one seed, learning rate {lr:g} (10x): "
            + "; ".join(
                f"{label}: validation loss {r['validation loss']:.4f}, RMS logsumexp {r['RMS logsumexp']:.3f}, "
                f"max grad norm {r['max grad norm']:.3g}, {r['spikes']} spikes"
                for label, r in stress_rows.items()
            ),
            "",
        ]
    series = {}
    for seed in seeds[:1]:
        for name, label in (("switch", "z-loss 1e-3"), ("switch_zloss0", "z-loss 0")):
            r = load_run(folder / f"{name}_s{seed}")
            series[f"{label} s{seed}"] = ([(st, math.sqrt(v)) for st, v in r.series("z_loss")], "-")
        for name, label in (("switch", "z-loss 1e-3"), ("switch_zloss0", "z-loss 0")):
            path = stress / f"{name}_lr{lr:g}"
            if (path / FINISHED).is_file():
                r = load_run(path)
                series[f"{label}, lr {lr:g}"] = ([(st, math.sqrt(v)) for st, v in r.series("z_loss")], ":")
    plot(
        study.report / "zloss_logits.png",
        "Router logit magnitude during training",
        "optimizer step",
        "RMS logsumexp of router logits",
        series,
        markers=False,
    )
    lines += ["![router logit magnitude](zloss_logits.png)", ""]


def section_overfitting(study: Study, seeds: list[int], lines: list[str], results: dict) -> None:
    folder = study.runs / "overfitting"
    names = ["dense", "switch", "switch_expert_dropout0.1", "switch_expert_dropout0.4", "switch_non_moe"]
    table = {}
    for name in names:
        runs = [load_run(folder / f"{name}_s{seed}") for seed in seeds]
        best = [min(evaluations(r), key=lambda p: p[1]) for r in runs]
        table[name] = {
            "best validation loss": [b[1] for b in best],
            "best step": [b[0] for b in best],
            "final validation loss": [evaluations(r)[-1][1] for r in runs],
            "final train (eval mode) loss": [r.last("eval_train_subset_task_loss") for r in runs],
            "final gap": [r.last("eval_validation_gap") for r in runs],
            "best validation accuracy": [max(v for _, v in r.series("eval_validation_accuracy")) for r in runs],
            "final validation accuracy": [r.last("eval_validation_accuracy") for r in runs],
        }
    results["overfitting"] = table
    s = study.size
    lines += [
        "## 2. Overfitting regime: which module does a snippet come from?",
        "",
        f"Sequence classification of 6-line snippets of the {s['classes']} largest top-level standard library modules "
        f"({', '.join(study.modules)}): {s['train_per_class']} training and {s['validation_per_class']} validation "
        f"snippets per module (disjoint), {s['epochs']} epochs, batch {s['cls_batch']}, "
        "learning rate 1e-3 (linear decay), "
        "dropout 0.1 outside the experts for every model (Switch Table 4's setting), the classification head new. "
        "The MoE variants are upcycled from the same dense LM as the dense control (section 1's settings). "
        f"Seeds {seeds}; mean ± standard deviation. Losses are task losses (nats); the gap is validation minus "
        "the training subset scored in evaluation mode.",
        "",
        "| run | " + " | ".join(next(iter(table.values()))) + " |",
        "|---|" + "---|" * len(next(iter(table.values()))),
    ]
    for name, values in table.items():
        lines.append(
            f"| {name} | "
            + " | ".join(mean_spread([float(v) for v in col if v is not None]) for col in values.values())
            + " |"
        )
    lines += ["", "![train and validation curves](overfitting_curves.png)", ""]
    plt = pyplot("the study's figures")

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for index, name in enumerate(names):
        r = load_run(folder / f"{name}_s{seeds[0]}")
        colour = f"C{index}"
        axes[0].plot(*zip(*evaluations(r), strict=True), "-", color=colour, marker=".", label=f"{name} validation")
        axes[0].plot(
            *zip(*r.series("eval_train_subset_task_loss"), strict=True), ":", color=colour, label=f"{name} train"
        )
        axes[1].plot(*zip(*r.series("eval_validation_gap"), strict=True), "-", color=colour, marker=".", label=name)
    axes[0].set_title(f"task loss, seed {seeds[0]} (solid: validation, dotted: train)")
    axes[1].set_title("generalisation gap (validation - train)")
    for axis in axes:
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(study.report / "overfitting_curves.png", dpi=100)
    plt.close(figure)


def section_expert_choice(study: Study, lines: list[str], results: dict) -> None:
    folder = study.runs / "expert_choice" / "expert_choice_c2_s0"
    rows = study.score_expert_choice(folder)
    results["expert_choice"] = rows
    lines += [
        "## 4. Expert Choice: causal threshold scoring vs training-mode scoring",
        "",
        "The dense start upcycled into Expert Choice (8 experts, capacity factor c = 2, every other layer, "
        "z-loss 1e-3), "
        f"fine-tuned {study.size['ec_steps']} steps with section 1's schedule; each saved checkpoint scored on the "
        "validation blocks twice: `threshold` routing (causal: a token goes to each expert whose running score "
        "threshold it passes; what generation uses) and `expert_choice` routing (as in training: each expert takes "
        "its top c*n/E tokens of the whole sequence, which looks at future tokens). Step 0 is the upcycled model "
        "before training, whose thresholds are still 0 (every token goes to every expert).",
        "",
        "| step | threshold (causal) loss | expert_choice (training-mode) loss | gap (threshold - expert_choice) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['step']} | {row['threshold']:.4f} | {row['expert_choice']:.4f} | "
            f"{row['threshold'] - row['expert_choice']:+.4f} |"
        )
    lines += ["", "![expert choice scoring](expert_choice_gap.png)", ""]
    plot(
        study.report / "expert_choice_gap.png",
        "Expert Choice: validation loss by inference routing",
        "optimizer step",
        "validation task loss",
        {
            "threshold (causal)": ([(r["step"], r["threshold"]) for r in rows], "-"),
            "expert_choice (training mode)": ([(r["step"], r["expert_choice"]) for r in rows], "--"),
        },
    )


def write_report(study: Study, args, started: float) -> Path:
    import transformers
    import trl

    s = study.size
    report = study.report
    report.mkdir(parents=True, exist_ok=True)
    upcycling, overfitting = study.runs / "upcycling", study.runs / "overfitting"
    seeds = [
        seed
        for seed in range(s["seeds"])
        if all((upcycling / f"{n}_s{seed}" / FINISHED).is_file() for n in ("dense", "switch", "switch_zloss0"))
    ]
    cls_seeds = [
        seed for seed in range(s["cls_seeds"]) if (overfitting / f"switch_non_moe_s{seed}" / FINISHED).is_file()
    ]
    stress_done = (study.runs / "zloss_high_lr" / f"switch_lr{s['stress_lr']:g}" / FINISHED).is_file()
    complete = len(seeds) == s["seeds"] and len(cls_seeds) == s["cls_seeds"] and (args.quick or stress_done)
    results: dict = {"mode": "quick" if args.quick else "full", "complete": complete, "sizes": s}
    pre = load_run(study.runs / "pretrain_dense")
    run_seconds = sum(float(p.read_text()) for p in study.runs.glob(f"**/{RUN_SECONDS}"))
    title = "quick mode: a pipeline check, not evidence" if args.quick else "full mode"
    lines = [
        f"# hf_moe study ({title}{'' if complete else '; PARTIAL: not every planned run finished'})",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by "
        f"`python recipes/study.py{' --quick' if args.quick else ''}` "
        f"on {platform.machine()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads), "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}. The runs took {run_seconds / 60:.1f} minutes of wall time.",
        "",
        f"Data: the standard library's top-level modules ({sysconfig.get_paths()['stdlib']}), every 8th file held out "
        f"for validation; a byte-level BPE tokenizer of {len(study.tokenizer)} tokens. Dense start: llama, "
        f"{s['layers']} layers, hidden {s['hidden_size']}, pre-trained {s['pretrain_steps']} steps through the CLM "
        f"recipe (final validation loss {pre.last('eval_validation_task_loss'):.4f}).",
        "",
    ]
    section_upcycling(study, seeds, lines, results)
    section_overfitting(study, cls_seeds, lines, results)
    section_zloss(study, seeds, lines, results)
    section_expert_choice(study, lines, results)
    # Per-section overlays with the compare tool (what a user would run on their own runs).
    lines += ["## Per-run tables and curves (`hf-moe compare`)", ""]
    for section in ("upcycling", "overfitting", "zloss_high_lr", "expert_choice"):
        folders = sorted(p for p in (study.runs / section).glob("*") if (p / FINISHED).is_file())
        if not folders:
            continue
        target = report / f"compare_{section}"
        compare_runs(folders, target, overwrite=True)
        lines += [
            f"### {section}",
            "",
            (target / "comparison.md").read_text(),
            f"![{section}](compare_{section}/loss_curves.png)",
            "",
        ]
    (report / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (report / REPORT).write_text("\n".join(lines))
    return report / REPORT


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="hf_moe_study")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline in under 2 minutes")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of sections 1 and 3 (full default 3)")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete an earlier study in --output_dir and start over"
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="train nothing: (re)write the report from the runs finished so far (marked partial if some are missing)",
    )
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be >= 1, got {args.seeds}")
        size["seeds"] = args.seeds
    output = Path(args.output_dir).resolve()
    if args.report_only:
        if not (output / "runs" / "pretrain_dense" / FINISHED).is_file():
            raise SystemExit(f"--report_only: {output} holds no finished study runs")
        study = Study(output, size)
        study.prepare_data()
        path = write_report(study, args, time.time())
        print(f"[study] report: {path}")
        return path
    if output.exists() and args.overwrite:
        shutil.rmtree(output)
    if (output / "report" / REPORT).is_file():
        raise SystemExit(f"--output_dir {output} holds a finished study; pass --overwrite to run it again")
    mode_file = output / "study_sizes.json"
    if mode_file.is_file() and json.loads(mode_file.read_text()) != size:
        raise SystemExit(
            f"--output_dir {output} holds runs of a study with other sizes (--quick or --seeds differ); "
            "choose another folder or pass --overwrite"
        )
    output.mkdir(parents=True, exist_ok=True)
    mode_file.write_text(json.dumps(size))
    started = time.time()
    study = Study(output, size)
    study.prepare_data()
    study.pretrain()
    # Order: one seed of everything first, so an interrupted study already has every section.
    study.upcycling_runs(0)
    study.classification_runs(0)
    study.expert_choice_run()
    for seed in range(1, size["seeds"]):
        study.upcycling_runs(seed)
    if not args.quick:
        study.stress_runs()
    for seed in range(1, size["cls_seeds"]):
        study.classification_runs(seed)
    path = write_report(study, args, started)
    print(f"[study] report: {path} ({(time.time() - started) / 60:.1f} minutes)")
    return path


if __name__ == "__main__":
    main()
