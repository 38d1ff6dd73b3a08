"""Compare fine-tuning runs: overlay their loss curves and tabulate their final metrics.

Reads what any `transformers.Trainer` (or TRL trainer) run leaves in its ``output_dir``:
``trainer_state.json`` (its ``log_history``; the newest ``checkpoint-*`` copy when the run did not
finish), ``config.json`` and the safetensors weights. With `hf_moe.MoeCallback` attached the
history also holds the task loss without router terms, the evaluation perplexity and gap, and the
time per step; without it the table falls back to ``loss`` / ``eval_loss``.
"""

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from .modeling.registry import routing_method_of
from .optional_dependencies import require_train_extra
from .plotting import pyplot

COMPARISON_TABLE = "comparison.md"
COMPARISON_PLOT = "loss_curves.png"


@dataclass
class Run:
    name: str
    path: Path
    log_history: list[dict]
    config: dict

    def series(self, *keys: str) -> list[tuple[int, float]]:
        """(step, value) of the first of ``keys`` that the history logs."""
        for key in keys:
            points = [(row["step"], row[key]) for row in self.log_history if key in row and "step" in row]
            if points:
                return points
        return []

    def last(self, *keys: str) -> float | None:
        points = self.series(*keys)
        return points[-1][1] if points else None


# Evaluation keys in order of preference: the hf_moe recipes evaluate a dict of datasets
# ("validation", "train_subset"), so their keys carry the dataset name; a plain Trainer's do not.
EVAL_LOSS_KEYS = ("eval_validation_task_loss", "eval_task_loss", "eval_validation_loss", "eval_loss")
TRAIN_LOSS_KEYS = ("task_loss", "loss")


def find_trainer_state(run_dir: Path) -> Path:
    candidates = [run_dir / "trainer_state.json"]
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    candidates += [c / "trainer_state.json" for c in reversed(checkpoints)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{run_dir} holds no trainer_state.json (nor a checkpoint-*/trainer_state.json): "
        "is it the output_dir of a Trainer run?"
    )


def load_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist")
    state_file = find_trainer_state(path)
    state = read_json_object(state_file, "a Trainer state file with a log_history")
    log_history = state.get("log_history")
    if not isinstance(log_history, list) or not all(isinstance(row, dict) for row in log_history):
        raise ValueError(
            f"{state_file} is not a Trainer state file with a log_history (a list of logged rows), "
            f"got {type(log_history).__name__}"
        )
    config_file = path / "config.json"
    config = read_json_object(config_file, "a model config") if config_file.is_file() else {}
    return Run(name=path.name, path=path, log_history=log_history, config=config)


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it is not text, not JSON or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not {what} (JSON): {type(error).__name__}: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not {what}: it holds a JSON {type(value).__name__}, not an object")
    return value


def run_task(run: Run) -> str | None:
    """ "causal LM" or "sequence classification", from the head in config.json or the logged metrics."""
    heads = " ".join(run.config.get("architectures") or [])
    if "ForCausalLM" in heads:
        return "causal LM"
    if "ForSequenceClassification" in heads:
        return "sequence classification"
    keys = {key for row in run.log_history for key in row}
    if any(key.endswith("perplexity") for key in keys):
        return "causal LM"
    if any(key.endswith(("accuracy", "_f1")) for key in keys):
        return "sequence classification"
    return None


def check_same_task(runs: list[Run]) -> None:
    """Losses of a causal LM (per token) and a classifier (per example) are not comparable: refuse the mix."""
    tasks = {run.name: task for run in runs if (task := run_task(run)) is not None}
    if len(set(tasks.values())) > 1:
        described = ", ".join(f"{name} ({task})" for name, task in tasks.items())
        raise ValueError(f"run_dirs must be runs of one task, got {described}: their losses are not comparable")


def parameter_counts(run: Run) -> tuple[int, float] | None:
    """(total, active per token) from the run's safetensors headers and config; None without weights.

    Active counts every non-expert parameter and, of the stacked expert weights, the share a token
    uses: k / E for token choice, c / E for expert choice (each expert takes c * T / E of T tokens).
    """
    files = sorted(run.path.glob("model*.safetensors"))
    if not files:
        return None
    total = experts = 0
    for file in files:
        with safe_open(file, framework="pt") as tensors:
            for name in tensors.keys():
                count = math.prod(tensors.get_slice(name).get_shape())
                total += count
                experts += count if ".experts." in name else 0
    config = run.config
    method = routing_method_of(config)
    share = 1.0
    if method is not None:
        fields = method.config_class.from_dict(config)  # validated, with the defaults of absent fields
        share = method.experts_per_token(fields) / fields.num_experts
    return total, total - experts + share * experts


def format_value(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def comparison_table(runs: list[Run]) -> str:
    header = (
        "| run | steps | train task loss | eval task loss | best eval task loss (step) | eval perplexity | "
        "eval gap | s/step | tokens/s | params total / active |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for run in runs:
        evaluations = run.series(*EVAL_LOSS_KEYS)
        best = min(evaluations, key=lambda point: point[1]) if evaluations else None
        counts = parameter_counts(run)
        steps = max((row.get("step", 0) for row in run.log_history), default=0)
        seconds = run.series("step_seconds")
        mean_seconds = sum(v for _, v in seconds) / len(seconds) if seconds else None
        throughput = run.series("tokens_per_second")
        mean_throughput = sum(v for _, v in throughput) / len(throughput) if throughput else None
        rows.append(
            "| "
            + " | ".join(
                [
                    run.name,
                    str(steps),
                    format_value(run.last(*TRAIN_LOSS_KEYS)),
                    format_value(evaluations[-1][1] if evaluations else None),
                    f"{best[1]:.4g} ({best[0]})" if best else "–",
                    format_value(run.last("eval_validation_perplexity", "eval_perplexity")),
                    format_value(run.last("eval_validation_gap", "eval_gap"), 3),
                    format_value(mean_seconds, 3),
                    format_value(mean_throughput, 4),
                    "–" if counts is None else f"{counts[0] / 1e6:.2f}M / {counts[1] / 1e6:.2f}M",
                ]
            )
            + " |"
        )
    return "\n".join(rows) + "\n"


def plot_runs(runs: list[Run], path: Path) -> Path:
    """Training and evaluation task loss of every run against the optimizer step, one colour a run."""
    plt = pyplot("hf-moe compare's plot")

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        for axis, keys in ((axes[0], TRAIN_LOSS_KEYS), (axes[1], EVAL_LOSS_KEYS)):
            points = run.series(*keys)
            if points:
                axis.plot(
                    *zip(*points, strict=True), color=colour, label=run.name, marker="." if axis is axes[1] else None
                )
    for axis, title in zip(axes, ("training task loss", "evaluation task loss"), strict=True):
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("loss (no router terms)")
    axes[1].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)
    return path


def compare_runs(run_dirs: list[str | Path], output_dir: str | Path | None = None, overwrite: bool = False) -> str:
    """The comparison table (Markdown) of ``run_dirs``; with ``output_dir``, also write it there as
    ``comparison.md`` next to ``loss_curves.png``. Existing files are kept unless ``overwrite``."""
    if not run_dirs:
        raise ValueError("run_dirs must name at least one run folder, got none")
    if output_dir is not None:  # the plot needs matplotlib: stop before anything is written
        require_train_extra("the loss-curve plot of hf-moe compare (compare_runs with output_dir)", ("matplotlib",))
    if output_dir is not None and not overwrite:
        existing = [
            Path(output_dir) / n for n in (COMPARISON_TABLE, COMPARISON_PLOT) if (Path(output_dir) / n).exists()
        ]
        if existing:
            raise FileExistsError(f"output_dir: {existing[0]} exists; pass overwrite=True to replace it")
    runs = [load_run(d) for d in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) != len(names):  # folders of the same name in different places
        for run in runs:
            run.name = str(run.path)
    check_same_task(runs)
    table = comparison_table(runs)
    if output_dir is not None:
        # Both files are written under temporary names first: a failure leaves no half-written comparison.
        output = Path(output_dir)
        output.mkdir(parents=True, exist_ok=True)
        staged = {name: output / f".{name}.partial" for name in (COMPARISON_TABLE, COMPARISON_PLOT)}
        try:
            staged[COMPARISON_TABLE].write_text(table)
            plot_runs(runs, staged[COMPARISON_PLOT])
            for name, path in staged.items():
                os.replace(path, output / name)
        finally:
            for path in staged.values():
                path.unlink(missing_ok=True)
    return table
