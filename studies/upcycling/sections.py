"""The report's sections: each reads finished runs, computes its numbers, appends Markdown to ``lines``, records
its numbers in ``results`` and draws its figures into ``report``."""

import math
import statistics
from pathlib import Path

from hf_moe.compare import load_run, parameter_counts
from hf_moe.plotting import pyplot

from .runs import FINISHED, Runs


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


def section_upcycling(runs: Runs, report: Path, seeds: list[int], lines: list[str], results: dict) -> None:
    s = runs.size
    folder = runs.folder / "upcycling"
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


def section_zloss(runs: Runs, report: Path, seeds: list[int], lines: list[str], results: dict) -> None:
    folder = runs.folder / "upcycling"
    steps = runs.size["steps"]
    table = {}
    for name, label in (("switch", "z-loss 1e-3"), ("switch_zloss0", "z-loss 0")):
        by_seed = [load_run(folder / f"{name}_s{seed}") for seed in seeds]
        table[label] = {
            "validation loss": [value_at_step(r, steps) for r in by_seed],
            "router logit RMS logsumexp (eval)": [math.sqrt(r.last("eval_validation_z_loss")) for r in by_seed],
            "max grad norm": [max(v for _, v in r.series("grad_norm")) for r in by_seed],
            "loss spikes (>10% over running min)": [loss_spikes(r) for r in by_seed],
            "expert balance (last eval, mean over layers)": [last_balance(r) for r in by_seed],
        }
    stress = runs.folder / "zloss_high_lr"
    lr = runs.size["stress_lr"]
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
        report / "zloss_logits.png",
        "Router logit magnitude during training",
        "optimizer step",
        "RMS logsumexp of router logits",
        series,
        markers=False,
    )
    lines += ["![router logit magnitude](zloss_logits.png)", ""]


def section_overfitting(runs: Runs, report: Path, seeds: list[int], lines: list[str], results: dict) -> None:
    folder = runs.folder / "overfitting"
    names = ["dense", "switch", "switch_expert_dropout0.1", "switch_expert_dropout0.4", "switch_non_moe"]
    table = {}
    for name in names:
        by_seed = [load_run(folder / f"{name}_s{seed}") for seed in seeds]
        best = [min(evaluations(r), key=lambda p: p[1]) for r in by_seed]
        table[name] = {
            "best validation loss": [b[1] for b in best],
            "best step": [b[0] for b in best],
            "final validation loss": [evaluations(r)[-1][1] for r in by_seed],
            "final train (eval mode) loss": [r.last("eval_train_subset_task_loss") for r in by_seed],
            "final gap": [r.last("eval_validation_gap") for r in by_seed],
            "best validation accuracy": [max(v for _, v in r.series("eval_validation_accuracy")) for r in by_seed],
            "final validation accuracy": [r.last("eval_validation_accuracy") for r in by_seed],
        }
    results["overfitting"] = table
    s = runs.size
    lines += [
        "## 2. Overfitting regime: which module does a snippet come from?",
        "",
        f"Sequence classification of 6-line snippets of the {s['classes']} largest top-level standard library modules "
        f"({', '.join(runs.data.modules)}): {s['train_per_class']} training and {s['validation_per_class']} validation "
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
    figure.savefig(report / "overfitting_curves.png", dpi=100)
    plt.close(figure)


def section_expert_choice(runs: Runs, report: Path, lines: list[str], results: dict) -> None:
    folder = runs.folder / "expert_choice" / "expert_choice_c2_s0"
    rows = runs.score_expert_choice(folder)
    results["expert_choice"] = rows
    lines += [
        "## 4. Expert Choice: causal threshold scoring vs training-mode scoring",
        "",
        "The dense start upcycled into Expert Choice (8 experts, capacity factor c = 2, every other layer, "
        "z-loss 1e-3), "
        f"fine-tuned {runs.size['ec_steps']} steps with section 1's schedule; each saved checkpoint scored on the "
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
        report / "expert_choice_gap.png",
        "Expert Choice: validation loss by inference routing",
        "optimizer step",
        "validation task loss",
        {
            "threshold (causal)": ([(r["step"], r["threshold"]) for r in rows], "-"),
            "expert_choice (training mode)": ([(r["step"], r["expert_choice"]) for r in rows], "--"),
        },
    )
