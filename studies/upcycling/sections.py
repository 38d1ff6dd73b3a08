"""The report's sections. Each reads finished runs (their logs through `hf_moe.compare.load_run`, the study's own
scores through `Runs.scores`), appends Markdown to ``lines``, records its numbers in ``results`` and draws its
figures into ``figures``. Comparisons are paired (same dense start, same fine-tuning seed): the mean difference
with its 95% t-interval. Learning rates and checkpoints are chosen on the validation split; every reported loss
and accuracy is on the test split."""

import math
import statistics
from pathlib import Path

from hf_moe.compare import load_run, parameter_counts
from hf_moe.plotting import pyplot

from .runs import BALANCE_SCOPES, DATA_PARALLEL, MODES, OVERFITTING, SWEEPS, Runs, dense_steps
from .stats import band, interval, mean_sd, paired, show

VALIDATION = "eval_validation_task_loss"


# ---- reading runs -------------------------------------------------------------------------------------------
def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def cpu_clock(run) -> list[tuple[int, float]]:
    """(step, this process's CPU seconds of training up to it), from the logged mean CPU time per step of each
    logging window (``step_cpu_seconds``, measured in-process by `MoeCallback`)."""
    points, total, previous = [(0, 0.0)], 0.0, 0
    for step, seconds in run.series("step_cpu_seconds"):
        total += seconds * (step - previous)
        previous = step
        points.append((step, total))
    return points


def training_flops_per_token(run, block: int) -> float:
    """6 x (active parameters, with tied embeddings counted once as the LM head's matmul) plus attention's
    6 x layers x context x hidden (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1)."""
    _, active = parameter_counts(run)
    config = run.config.get("text_config", run.config)
    return 6 * active + 6 * config["num_hidden_layers"] * block * config["hidden_size"]


def mean_over_layers(run, suffix: str, prefix: str = "router/") -> float | None:
    """Mean over the training logs and MoE layers of ``{prefix}layer{L}/{suffix}``."""
    values = [v for row in run.log_history for k, v in row.items() if k.startswith(prefix) and k.endswith(suffix)]
    return statistics.fmean(values) if values else None


def loss_spikes(run, key: str = "task_loss", ratio: float = 1.1) -> int:
    """Logged training losses more than ``ratio`` times the lowest one logged before them."""
    best, spikes = math.inf, 0
    for _, value in run.series(key):
        spikes += value > ratio * best
        best = min(best, value)
    return spikes


def scored_test_losses(runs: Runs, folder: str) -> list[tuple[int, float]]:
    return sorted((int(step), loss) for step, loss in runs.scores(folder)["test_loss"].items())


def lm_pair(runs: Runs, moe_folder: str, dense_folder: str) -> dict:
    """One paired comparison of an MoE run and the dense continuation from the same start and seed, on the test
    split: at equal steps, at the MoE's training FLOPs and at its in-process CPU time."""
    s = runs.size
    moe, dense = load_run(runs.folder / moe_folder), load_run(runs.folder / dense_folder)
    steps = s["steps"]
    moe_test, dense_test = dict(scored_test_losses(runs, moe_folder)), scored_test_losses(runs, dense_folder)
    flops_ratio = training_flops_per_token(moe, s["block"]) / training_flops_per_token(dense, s["block"])
    moe_cpu = interpolate(cpu_clock(moe), steps)
    dense_clock = dict(cpu_clock(dense))
    dense_cpu = [(interpolate(list(dense_clock.items()), step), loss) for step, loss in dense_test]
    dense_cpu = [(x, y) for x, y in dense_cpu if x is not None]
    return {
        "moe": moe_test.get(steps),
        "dense_equal_steps": dict(dense_test).get(steps),
        "dense_equal_flops": interpolate(dense_test, steps * flops_ratio),
        "dense_equal_cpu_time": interpolate(dense_cpu, moe_cpu) if moe_cpu is not None else None,
        "flops_ratio": flops_ratio,
        "moe_cpu_seconds_per_step": moe_cpu / steps if moe_cpu is not None else None,
        "dense_cpu_seconds_per_step": (interpolate(cpu_clock(dense), steps) or 0) / steps,
        "moe_dropped_fraction": mean_over_layers(moe, "/dropped_fraction"),
    }


def plot_bands(path: Path, title: str, xlabel: str, ylabel: str, curves: dict[str, list]) -> None:
    """One line per label: the mean over its runs with the 95% interval of the mean as a band."""
    plt = pyplot("the study's figures")
    figure, axes = plt.subplots(figsize=(6.4, 4))
    for index, (label, runs) in enumerate(curves.items()):
        rows = band([r for r in runs if r])
        if not rows:
            continue
        x, mean, low, high = zip(*rows, strict=True)
        axes.plot(x, mean, "-", color=f"C{index}", marker=".", label=f"{label} (n={len(runs)})")
        axes.fill_between(x, low, high, color=f"C{index}", alpha=0.2, linewidth=0)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def pairs(runs: Runs, folders: list[str], starts, seeds) -> list[tuple[int, int]]:
    """The (start, seed) pairs for which every run ``folder.format(start=, seed=)`` finished."""
    return [
        (k, seed) for k in starts for seed in seeds if all(runs.finished(f.format(start=k, seed=seed)) for f in folders)
    ]


# ---- 1. upcycling -------------------------------------------------------------------------------------------
UPCYCLING = ["upcycling/start{start}/dense_s{seed}", "upcycling/start{start}/switch_s{seed}"]


def section_upcycling(runs: Runs, figures: Path, lines: list[str], results: dict) -> None:
    s = runs.size
    done = pairs(runs, UPCYCLING, range(s["starts"]), range(s["seeds"]))
    rows = [lm_pair(runs, *(f.format(start=k, seed=seed) for f in UPCYCLING[::-1])) for k, seed in done]
    results["upcycling"] = {f"start{k}_s{seed}": row for (k, seed), row in zip(done, rows, strict=True)}

    def column(key):
        return [row[key] for row in rows]

    differences = {
        key: paired(column("moe"), column(key))
        for key in ("dense_equal_steps", "dense_equal_flops", "dense_equal_cpu_time")
    }
    results["upcycling_differences"] = differences
    flops = statistics.fmean(column("flops_ratio")) if rows else float("nan")
    lines += [
        "## 1. Upcycling vs dense continuation",
        "",
        f"{s['starts']} dense starts x {s['seeds']} fine-tuning seeds ({len(done)} pairs finished). From each start, "
        f"{s['steps']} steps of {s['batch']} x {s['block']} tokens at a constant learning rate of "
        f"{s['learning_rate']:g} after 5 warm-up steps, no dropout; the MoE is the upcycled Switch model (8 experts, "
        "renormalised top-2, every other layer, capacity 1.25 in training, dropless evaluation, z-loss 1e-3, "
        f"balancing loss 1e-2). The dense continuation runs {dense_steps(s)} steps and is read at the MoE's step "
        "count, at the MoE's training FLOPs and at the MoE's in-process CPU time (interpolated between its "
        "checkpoints). Losses: test split, nats per token, no router terms.",
        "",
        "| | test loss (mean ± sd) | MoE - dense (95% CI over pairs) |",
        "|---|---|---|",
        f"| upcycled MoE, step {s['steps']} | {mean_sd(column('moe'))} | |",
    ]
    for key, label in (
        ("dense_equal_steps", f"dense, equal steps ({s['steps']})"),
        ("dense_equal_flops", f"dense, equal training FLOPs (x{flops:.2f} steps)"),
        ("dense_equal_cpu_time", "dense, equal CPU time"),
    ):
        lines.append(f"| {label} | {mean_sd(column(key))} | {show(differences[key])} |")
    lines += [
        "",
        f"Training cost per step (this process's CPU time, all threads, measured in-process): MoE "
        f"{mean_sd(column('moe_cpu_seconds_per_step'), 3)} s, dense {mean_sd(column('dense_cpu_seconds_per_step'), 3)} "
        f"s; training FLOPs per token MoE / dense = {flops:.3f}. Token-expert pairs dropped by the capacity limit in "
        f"training: {mean_sd(column('moe_dropped_fraction'), 4)} (mean over logged steps and MoE layers).",
        "",
        "![validation loss against step](upcycling_validation.png)",
        "",
    ]
    curves = {"dense": [], "switch MoE": []}
    for k, seed in done:
        for label, folder in (("dense", UPCYCLING[0]), ("switch MoE", UPCYCLING[1])):
            run = load_run(runs.folder / folder.format(start=k, seed=seed))
            curves[label].append(run.series(VALIDATION))
    plot_bands(
        figures / "upcycling_validation.png",
        "Upcycling vs dense continuation (validation)",
        "optimizer step",
        "validation task loss",
        curves,
    )


# ---- 2. overfitting -----------------------------------------------------------------------------------------
def chosen_checkpoint(runs: Runs, folder: str) -> dict:
    """The checkpoint with the lowest validation loss (the study saves one at every evaluation), scored on test."""
    run = load_run(runs.folder / folder)
    test = runs.scores(folder)["test"]
    validation = [(step, loss) for step, loss in run.series(VALIDATION) if str(step) in test]
    step = min(validation, key=lambda p: p[1])[0]
    return {
        "step": step,
        "validation_loss": dict(validation)[step],
        "test_accuracy": test[str(step)]["accuracy"],
        "test_loss": test[str(step)]["loss"],
        "final_gap": run.last("eval_validation_gap"),
        "final_validation_loss": run.last(VALIDATION),
        "best_validation_loss": min(v for _, v in run.series(VALIDATION)),
    }


# The rule for the defaults: the paper's value stays unless an alternative differs from it in test accuracy with a
# 95% interval that excludes zero, in the alternative's favour.
REFERENCE = {
    "expert dropout": ("expert_dropout0.4", "Switch Transformer Table 4: 0.4"),
    "what trains": ("switch", "ST-MoE section 4.1: all parameters"),
}
ALTERNATIVES = {
    "expert dropout": ["switch", "expert_dropout0.1", "expert_dropout0.2"],
    "what trains": ["train_non_moe", "train_routers"],
}


def recommendation(differences: dict[str, dict], reference: str) -> tuple[str, str]:
    """(choice, reason) by the rule above, from {alternative: paired CI of alternative - reference accuracy}."""
    better = {name: ci for name, ci in differences.items() if ci["excludes_zero"] and ci["mean"] > 0}
    if not better:
        return reference, "no alternative differs measurably (every 95% interval includes zero or favours the paper)"
    name = max(better, key=lambda n: better[n]["low"])
    return name, f"{name} is more accurate by {show(better[name], 3)}"


def section_overfitting(runs: Runs, figures: Path, lines: list[str], results: dict) -> None:
    s = runs.size
    seeds = [
        seed for seed in range(s["cls_seeds"]) if all(runs.finished(f"overfitting/{n}_s{seed}") for n in OVERFITTING)
    ]
    table = {name: [chosen_checkpoint(runs, f"overfitting/{name}_s{seed}") for seed in seeds] for name in OVERFITTING}
    chance = 1 / s["classes"]
    learned = {name: interval([r["test_accuracy"] for r in rows]) for name, rows in table.items()}
    results["overfitting"] = {"chance": chance, "runs": table, "test_accuracy": learned}
    lines += [
        "## 2. Overfitting regime: which module does a snippet come from?",
        "",
        f"Sequence classification of {s['snippet_lines']}-line snippets of the {s['classes']} largest top-level "
        f"standard library modules ({', '.join(runs.data.modules)}; chance {chance:.3f}): {s['train_per_class']} "
        f"training, {s['validation_per_class']} validation and {s['test_per_class']} test snippets per module "
        f"(disjoint), {s['epochs']} epochs, batch {s['cls_batch']}, learning rate {s['cls_lr']:g} (linear decay), "
        "dropout 0.1 outside the experts for every model, the classification head new; the MoE variants are "
        "upcycled from dense start 0 with section 1's settings. For each run the checkpoint with the lowest "
        f"validation loss is chosen (one every half epoch) and scored on the test split. Seeds {seeds}.",
        "",
        "| run | test accuracy (95% CI) | test loss | chosen step | final validation loss | final gap (validation - "
        "train) |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in table.items():
        ci = learned[name]
        accuracy = show(ci, 3, signed=False)
        lines.append(
            f"| {name} | {accuracy} | {mean_sd([r['test_loss'] for r in rows])} | "
            f"{', '.join(str(r['step']) for r in rows)} | {mean_sd([r['final_validation_loss'] for r in rows])} | "
            f"{mean_sd([r['final_gap'] for r in rows])} |"
        )
    above = [name for name, ci in learned.items() if ci["low"] is not None and ci["low"] > chance]
    lines += [
        "",
        f"Learned above chance (the 95% interval of test accuracy above {chance:.3f}): "
        f"{', '.join(above) if above else 'none'}.",
        "",
    ]
    defaults = {}
    for question, (reference, source) in REFERENCE.items():
        differences = {
            name: paired([r["test_accuracy"] for r in table[name]], [r["test_accuracy"] for r in table[reference]])
            for name in ALTERNATIVES[question]
        }
        choice, reason = recommendation(differences, reference)
        defaults[question] = {"reference": reference, "differences": differences, "choice": choice, "reason": reason}
        lines += [
            f"**{question}** (the paper's value: {source}; test accuracy of each alternative minus `{reference}`): "
            + "; ".join(f"{name} {show(ci, 3)}" for name, ci in differences.items())
            + f". Choice: `{choice}`: {reason}.",
            "",
        ]
    results["overfitting"]["defaults"] = defaults
    curves = {
        name: [load_run(runs.folder / f"overfitting/{name}_s{seed}").series(VALIDATION) for seed in seeds]
        for name in OVERFITTING
    }
    plot_bands(
        figures / "overfitting_validation.png",
        "Classification: validation loss",
        "optimizer step",
        "validation task loss",
        curves,
    )
    gaps = {
        name: [load_run(runs.folder / f"overfitting/{name}_s{seed}").series("eval_validation_gap") for seed in seeds]
        for name in OVERFITTING
    }
    plot_bands(
        figures / "overfitting_gap.png",
        "Classification: generalisation gap",
        "optimizer step",
        "validation - train task loss",
        gaps,
    )
    lines += ["![validation loss](overfitting_validation.png) ![gap](overfitting_gap.png)", ""]


# ---- 3. z-loss ----------------------------------------------------------------------------------------------
ROUTER_STATISTICS = {
    "rms_logsumexp": "RMS logsumexp (what the z-loss penalises)",
    "logit_rms": "raw logit RMS",
    "logit_mean": "raw logit mean",
    "max_abs_logit": "max |logit|",
    "spread": "spread across experts (sd)",
}


def section_zloss(runs: Runs, figures: Path, lines: list[str], results: dict) -> None:
    s = runs.size
    arms = {
        "z-loss 1e-3": "upcycling/start{start}/switch_s{seed}",
        "z-loss 0": "upcycling/start{start}/switch_zloss0_s{seed}",
    }
    done = pairs(runs, list(arms.values()), range(s["starts"]), range(s["seeds"]))
    per_arm = {}
    for label, folder in arms.items():
        names = [folder.format(start=k, seed=seed) for k, seed in done]
        per_arm[label] = {
            "test loss": [runs.scores(n)["test_loss"].get(str(s["steps"])) for n in names],
            **{key: [runs.scores(n)["router"][key] for n in names] for key in ROUTER_STATISTICS},
            "dropped fraction (training)": [
                mean_over_layers(load_run(runs.folder / n), "/dropped_fraction") for n in names
            ],
        }
    metrics = list(next(iter(per_arm.values())))
    differences = {m: paired(per_arm["z-loss 1e-3"][m], per_arm["z-loss 0"][m]) for m in metrics}
    results["zloss"] = {"pairs": [f"start{k}_s{seed}" for k, seed in done], "arms": per_arm, "differences": differences}
    lines += [
        "## 3. Router z-loss 1e-3 vs 0",
        "",
        f"Section 1's MoE runs and the same with the z-loss coefficient 0 ({len(done)} pairs). The z-loss (ST-MoE "
        "eq. 5) is the mean over tokens of the squared logsumexp of the router logits, so it acts on the "
        "logsumexp: it can be lowered by shifting all of a token's logits down, which changes neither the softmax "
        "nor the top-k choice, as well as by shrinking them. Hence both the logsumexp and the raw logits are "
        "reported, measured on the test split with each final model (every MoE layer's tokens together). "
        f"Training precision: {'bf16 autocast' if s['bf16'] else 'float32'}; hf_moe computes the router logits in "
        "float32 in either case (ST-MoE's selective precision), so this is not a test of a bf16 router.",
        "",
        "| | z-loss 1e-3 | z-loss 0 | difference (95% CI) |",
        "|---|---|---|---|",
    ]
    for m in metrics:
        label = ROUTER_STATISTICS.get(m, m)
        lines.append(
            f"| {label} | {mean_sd(per_arm['z-loss 1e-3'][m])} | {mean_sd(per_arm['z-loss 0'][m])} | "
            f"{show(differences[m])} |"
        )
    lines.append("")
    stress = {"z-loss 1e-3": "zloss_high_lr/switch_s{seed}", "z-loss 0": "zloss_high_lr/switch_zloss0_s{seed}"}
    seeds = [seed for _, seed in pairs(runs, list(stress.values()), [0], range(s["sweep_seeds"]))]
    if seeds:
        high = {}
        for label, folder in stress.items():
            names = [folder.format(seed=seed) for seed in seeds]
            logged = [load_run(runs.folder / n) for n in names]
            high[label] = {
                "test loss": [runs.scores(n)["test_loss"].get(str(s["steps"])) for n in names],
                "rms_logsumexp": [runs.scores(n)["router"]["rms_logsumexp"] for n in names],
                "logit_rms": [runs.scores(n)["router"]["logit_rms"] for n in names],
                "max grad norm": [max(v for _, v in r.series("grad_norm")) for r in logged],
                "loss spikes (>10% over the running minimum)": [float(loss_spikes(r)) for r in logged],
            }
        high_diff = {m: paired(high["z-loss 1e-3"][m], high["z-loss 0"][m]) for m in high["z-loss 1e-3"]}
        results["zloss_high_lr"] = {"seeds": seeds, "arms": high, "differences": high_diff}
        lines += [
            f"Stress test at learning rate {s['stress_lr']:g} (start 0, seeds {seeds}):",
            "",
            "| | z-loss 1e-3 | z-loss 0 | difference (95% CI) |",
            "|---|---|---|---|",
        ]
        for m in high["z-loss 1e-3"]:
            lines.append(
                f"| {ROUTER_STATISTICS.get(m, m)} | {mean_sd(high['z-loss 1e-3'][m])} | "
                f"{mean_sd(high['z-loss 0'][m])} | {show(high_diff[m])} |"
            )
        lines.append("")
    curves = {
        label: [
            [(st, math.sqrt(v)) for st, v in load_run(runs.folder / folder.format(start=k, seed=seed)).series("z_loss")]
            for k, seed in done
        ]
        for label, folder in arms.items()
    }
    plot_bands(
        figures / "zloss_logsumexp.png",
        "Router RMS logsumexp during training",
        "optimizer step",
        "RMS logsumexp of router logits",
        curves,
    )
    lines += ["![router logsumexp](zloss_logsumexp.png)", ""]


# ---- 4. Expert Choice ---------------------------------------------------------------------------------------
def section_expert_choice(runs: Runs, figures: Path, lines: list[str], results: dict) -> None:
    s = runs.size
    folder = "expert_choice/start{start}/expert_choice_c2_s{seed}"
    done = pairs(runs, [folder], range(s["starts"]), range(s["ec_seeds"]))
    scored = {k: runs.scores(folder.format(start=k[0], seed=k[1]))["inference_routing"] for k in done}
    steps = sorted(set.intersection(*(set(r["step"] for r in rows) for rows in scored.values()))) if scored else []
    table = []
    for step in steps:
        row = {
            m: [next(r[m] for r in scored[k] if r["step"] == step) for k in done]
            for m in ("threshold", "expert_choice")
        }
        table.append({"step": step, **row, "gap": paired(row["threshold"], row["expert_choice"])})
    results["expert_choice"] = table
    lines += [
        "## 4. Expert Choice: causal threshold scoring vs training-mode scoring",
        "",
        f"Each dense start upcycled into Expert Choice ({len(done)} starts x seeds; 8 experts, capacity factor "
        f"c = 2, every other layer, z-loss 1e-3) and fine-tuned {s['ec_steps']} steps with section 1's schedule; "
        "each checkpoint scored on the test split twice: `threshold` routing (causal: a token goes to each expert "
        "whose running score threshold it passes; what generation uses) and `expert_choice` routing (as in "
        "training: each expert takes its top c*n/E tokens of the whole sequence, which looks at future tokens). "
        "Step 0 is the upcycled model before training, whose thresholds are still 0 (every token goes to every "
        "expert).",
        "",
        "| step | threshold (causal) loss | expert_choice (training-mode) loss | threshold - expert_choice (95% CI) |",
        "|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['step']} | {mean_sd(row['threshold'])} | {mean_sd(row['expert_choice'])} | {show(row['gap'])} |"
        )
    curves = {m: [[(r["step"], r[m]) for r in scored[k]] for k in done] for m in ("threshold", "expert_choice")}
    plot_bands(
        figures / "expert_choice_gap.png",
        "Expert Choice: test loss by inference routing",
        "optimizer step",
        "test task loss",
        curves,
    )
    lines += ["", "![expert choice scoring](expert_choice_gap.png)", ""]


# ---- 5. sweeps ----------------------------------------------------------------------------------------------
def against_dense(runs: Runs, folders: list[tuple[str, str]], seeds: list[int]) -> dict:
    """One setting's (MoE folder, dense folder) pairs, one per seed: its test loss, its FLOPs per token over the
    dense model's, the pairs it dropped in training and the paired differences from dense at equal steps and FLOPs."""
    compared = [lm_pair(runs, moe, dense) for moe, dense in folders]
    return {
        "seeds": seeds,
        "moe": [c["moe"] for c in compared],
        "equal_flops": paired([c["moe"] for c in compared], [c["dense_equal_flops"] for c in compared]),
        "equal_steps": paired([c["moe"] for c in compared], [c["dense_equal_steps"] for c in compared]),
        "flops_ratio": statistics.fmean([c["flops_ratio"] for c in compared]) if compared else None,
        "dropped_fraction": [c["moe_dropped_fraction"] for c in compared],
    }


def section_sweeps(runs: Runs, figures: Path, lines: list[str], results: dict) -> None:
    s = runs.size
    seeds = range(s["sweep_seeds"])
    dense = "upcycling/start0/dense_s{seed}"
    settings = {"section 1's MoE": "upcycling/start0/switch_s{seed}"}
    settings.update({name: f"sweeps/{name}_s{{seed}}" for name in [*SWEEPS, *BALANCE_SCOPES]})
    rows = {}
    for name, folder in settings.items():
        done = [seed for _, seed in pairs(runs, [folder, dense], [0], seeds)]
        rows[name] = against_dense(runs, [(folder.format(seed=x), dense.format(seed=x)) for x in done], done)
    # Learning rate: each arm's factor chosen on the mean final validation loss, the pair compared on test.
    lr = {}
    for factor in s["lr_factors"]:
        moe = "upcycling/start0/switch_s{seed}" if factor == 1.0 else f"sweeps/switch_lr{factor:g}_s{{seed}}"
        den = dense if factor == 1.0 else f"sweeps/dense_lr{factor:g}_s{{seed}}"
        done = [seed for _, seed in pairs(runs, [moe, den], [0], seeds)]
        lr[factor] = {
            "moe": moe,
            "dense": den,
            "seeds": done,
            "moe_validation": statistics.fmean(
                [load_run(runs.folder / moe.format(seed=x)).last(VALIDATION) for x in done]
            )
            if done
            else math.inf,
            "dense_validation": statistics.fmean(
                [load_run(runs.folder / den.format(seed=x)).last(VALIDATION) for x in done]
            )
            if done
            else math.inf,
        }
    best_moe = min(lr, key=lambda f: lr[f]["moe_validation"])
    best_dense = min(lr, key=lambda f: lr[f]["dense_validation"])
    done = sorted(set(lr[best_moe]["seeds"]) & set(lr[best_dense]["seeds"]))
    tuned = [(lr[best_moe]["moe"].format(seed=x), lr[best_dense]["dense"].format(seed=x)) for x in done]
    rows[f"tuned learning rates (MoE x{best_moe:g}, dense x{best_dense:g})"] = against_dense(runs, tuned, done)
    wins = [
        name for name, row in rows.items() if row["equal_flops"]["excludes_zero"] and row["equal_flops"]["mean"] < 0
    ]
    # Balancing scope: the two 2-process runs of each seed, paired.
    micro, total = (f"sweeps/{name}_s{{seed}}" for name in BALANCE_SCOPES)
    done = [seed for _, seed in pairs(runs, [micro, total], [0], seeds)]
    scope = {}
    for label, measure in (
        ("test loss", lambda folder: runs.scores(folder)["test_loss"].get(str(s["steps"]))),
        ("balance", lambda folder: mean_over_layers(load_run(runs.folder / folder), "/balance")),
        ("dropped pairs", lambda folder: mean_over_layers(load_run(runs.folder / folder), "/dropped_fraction")),
    ):
        arms = [[measure(folder.format(seed=x)) for x in done] for folder in (total, micro)]
        scope[label] = {"global_batch": arms[0], "micro_batch": arms[1], "difference": paired(*arms)}
    results["sweeps"] = {
        "settings": rows,
        "learning_rates": lr,
        "moe_wins_at_equal_flops": wins,
        "balance_scope": {"seeds": done, **scope},
    }
    lines += [
        "## 5. Sweeps: does any setting make the MoE win at equal FLOPs?",
        "",
        f"Each row changes one setting of section 1's MoE (dense start 0, seeds {list(seeds)}) and compares it with "
        "the dense continuation of the same seed at equal steps and at the row's own training FLOPs (test loss, "
        f"MoE - dense, 95% CI). Learning rates x{', x'.join(f'{f:g}' for f in s['lr_factors'])} of "
        f"{s['learning_rate']:g} for each arm, chosen on the validation split. The `processes2_*` rows train on "
        f"{DATA_PARALLEL} data-parallel CPU processes (torchrun, gloo), each taking 1/{DATA_PARALLEL} of the batch, "
        "with the balancing loss over each process's micro-batch or over the global batch (`balance_scope`, Qiu et "
        "al. 2025, arXiv 2501.11873); in one process the two count the same tokens.",
        "",
        "| setting | MoE test loss | FLOPs / dense | dropped pairs | MoE - dense, equal steps "
        "| MoE - dense, equal FLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        ratio = f"{row['flops_ratio']:.2f}" if row["flops_ratio"] else "–"
        lines.append(
            f"| {name} | {mean_sd(row['moe'])} | {ratio} | {mean_sd(row['dropped_fraction'], 3)} | "
            f"{show(row['equal_steps'])} | {show(row['equal_flops'])} |"
        )
    lines += [
        "",
        "Learning rate (mean final validation loss): "
        + "; ".join(f"x{f:g}: MoE {v['moe_validation']:.4f}, dense {v['dense_validation']:.4f}" for f, v in lr.items()),
        "",
        "The MoE wins at equal FLOPs (interval below zero) with: " + (", ".join(wins) if wins else "no setting") + ".",
        "",
        f"Balancing scope, global batch - micro batch ({DATA_PARALLEL} processes, seeds {done}, 95% CI): "
        + "; ".join(
            f"{label} {show(row['difference'], 4 if label == 'test loss' else 3)}" for label, row in scope.items()
        )
        + ".",
        "",
    ]


# ---- 6. upcycling modes -------------------------------------------------------------------------------------
MODE_LABELS = {
    "granularity2": "fine-grained, G = 2 (16 experts of I/2, top-4)",
    "granularity4": "fine-grained, G = 4 (32 experts of I/4, top-8)",
    "shared_expert_top1": "shared expert (the whole FFN) + top-1 of 8",
    "aux_free": "auxiliary-loss-free balancing (sigmoid scores, bias rate 1e-3)",
    "no_balancing": "top-2, no balancing (aux_free's control)",
}


def section_modes(runs: Runs, figures: Path, lines: list[str], results: dict) -> None:
    s = runs.size
    seeds = range(s["sweep_seeds"])
    dense, plain = "upcycling/start0/dense_s{seed}", "upcycling/start0/switch_s{seed}"
    settings = {"plain upcycling (G = 1, section 1's MoE)": plain}
    settings.update({MODE_LABELS[name]: f"modes/{name}_s{{seed}}" for name in MODES})
    rows = {}
    for label, folder in settings.items():
        done = [seed for _, seed in pairs(runs, [folder, dense, plain], [0], seeds)]
        names = [folder.format(seed=x) for x in done]
        row = against_dense(runs, [(n, dense.format(seed=x)) for n, x in zip(names, done, strict=True)], done)
        logged = [load_run(runs.folder / n) for n in names]
        row["balance"] = [mean_over_layers(r, "/balance") for r in logged]
        if folder == plain:  # the reference
            rows[label] = row
            continue
        plain_loss = [runs.scores(plain.format(seed=x))["test_loss"].get(str(s["steps"])) for x in done]
        row["minus_plain"] = paired(row["moe"], plain_loss)
        row["balance_minus_plain"] = paired(
            row["balance"], [mean_over_layers(load_run(runs.folder / plain.format(seed=x)), "/balance") for x in done]
        )
        rows[label] = row
    results["modes"] = rows
    lines += [
        "## 6. Upcycling modes: fine-grained experts, a shared expert, balancing without an auxiliary loss",
        "",
        f"Each mode upcycles dense start 0 and fine-tunes with section 1's schedule (seeds {list(seeds)}), at the "
        "active parameters of section 1's MoE (two FFN widths per token) and capacity factor 1.25, and is compared "
        "with section 1's plain upcycling of the same seed (test loss, 95% CI) and with the dense continuation at "
        "equal FLOPs. Fine-grained: He et al. 2024 (arXiv 2410.07524), virtual-group initialisation. Shared expert: "
        "Qwen2-MoE / DeepSeekMoE (Dai et al. 2024); the whole FFN stays always on and the routed experts start with "
        "zero output. Auxiliary-loss-free: Wang et al. 2024 (arXiv 2408.15664) and DeepSeek-V3 (section 2.1.2); the "
        "control drops the balancing loss without adding the biases. Balance: exp(entropy of the expert load) / "
        "experts, 1 = uniform, mean over logged training steps and MoE layers.",
        "",
        "| mode | MoE test loss | mode - plain upcycling (95% CI) | FLOPs / dense | balance | balance - plain "
        "(95% CI) | dropped pairs | MoE - dense, equal FLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        ratio = f"{row['flops_ratio']:.2f}" if row["flops_ratio"] else "–"
        reference = "minus_plain" not in row
        lines.append(
            f"| {label} | {mean_sd(row['moe'])} | {'(reference)' if reference else show(row['minus_plain'])} | "
            f"{ratio} | {mean_sd(row['balance'], 3)} | "
            f"{'(reference)' if reference else show(row['balance_minus_plain'], 3)} | "
            f"{mean_sd(row['dropped_fraction'], 3)} | {show(row['equal_flops'])} |"
        )
    differences = {label: row["minus_plain"] for label, row in rows.items() if "minus_plain" in row}
    better = [label for label, ci in differences.items() if ci["excludes_zero"] and ci["mean"] < 0]
    worse = [label for label, ci in differences.items() if ci["excludes_zero"] and ci["mean"] > 0]
    lines += [
        "",
        "Better than plain upcycling (interval below zero): "
        + (", ".join(better) if better else "none")
        + "; worse (interval above zero): "
        + (", ".join(worse) if worse else "none")
        + ". Where neither, there is no measurable difference at this scale.",
        "",
    ]
