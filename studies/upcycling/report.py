"""The report: ``report/study.md`` and ``report/study/`` (``results.json`` with the provenance, the figures, the
per-section overlays made by `hf_moe.compare`), laid out as ``docs/study.md`` and ``docs/study/`` so that
`publish` can put them there."""

import json
import os
import platform
import shutil
import sysconfig
from datetime import UTC, datetime
from pathlib import Path

import torch

from hf_moe.compare import compare_runs, load_run

from .provenance import provenance
from .runs import FINISHED, RUN_SECONDS, Runs, configuration
from .sections import (
    section_expert_choice,
    section_modes,
    section_overfitting,
    section_sweeps,
    section_upcycling,
    section_zloss,
)

REPORT = "study.md"
FOLDER = "study"  # next to REPORT: results.json, figures, compare_*


def command(quick: bool, scale: bool) -> str:
    return "python -m studies.upcycling" + (" --quick" if quick else "") + (" --scale" if scale else "")


def timing(runs: Runs) -> dict[str, dict]:
    """Per section (the runs' top folder): runs finished, their wall seconds (loading, training, evaluation,
    saving) and their training CPU seconds (the logged mean CPU time per step x steps)."""
    sections: dict[str, dict] = {}
    for folder in runs.plan:
        path = runs.folder / folder
        if not (path / FINISHED).is_file():
            continue
        row = sections.setdefault(folder.split("/")[0], {"runs": 0, "wall_seconds": 0.0, "training_cpu_seconds": 0.0})
        row["runs"] += 1
        row["wall_seconds"] += float((path / RUN_SECONDS).read_text())
        run = load_run(path)
        previous = 0
        for step, seconds in run.series("step_cpu_seconds"):
            row["training_cpu_seconds"] += seconds * (step - previous)
            previous = step
    return sections


def write_report(runs: Runs, quick: bool, scale: bool) -> Path:
    import transformers
    import trl

    s = runs.size
    target = runs.output / "report"
    figures = target / FOLDER
    figures.mkdir(parents=True, exist_ok=True)
    complete = all(runs.finished(folder) for folder in runs.plan)
    mode = ("quick " if quick else "") + ("scale" if scale else "CPU")
    results: dict = {"mode": mode, "complete": complete}
    pre = [load_run(runs.dense_start(k)).last("eval_validation_task_loss") for k in range(s["starts"])]
    spent = timing(runs)
    title = "quick mode: a pipeline check, not evidence" if quick else f"{mode} mode"
    lines = [
        f"# hf_moe upcycling study ({title}{'' if complete else '; PARTIAL: not every planned run finished'})",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{command(quick, scale)}` on {platform.machine()} "
        f"({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
        + (f", {torch.cuda.get_device_name()}" if not s["use_cpu"] and torch.cuda.is_available() else "")
        + f"), Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}. The runs took {sum(r['wall_seconds'] for r in spent.values()) / 60:.1f} minutes of "
        "wall time. What produced this report (the code's hash, the git commit, every run's command line) is in "
        f"[{FOLDER}/results.json]({FOLDER}/results.json) under `provenance`.",
        "",
        f"Data: the standard library's {'modules' if s['recursive'] else 'top-level modules'} "
        f"({sysconfig.get_paths()['stdlib']}), every 8th file held out, alternately for validation (choosing) and "
        f"test (reporting); a byte-level BPE tokenizer of {len(runs.data.tokenizer)} tokens. Dense starts: "
        f"{s['starts']} llama models ({s['layers']} layers, hidden {s['hidden_size']}), each initialised and "
        f"pre-trained {s['pretrain_steps']} steps through the CLM recipe with its own seed (final validation loss "
        f"{', '.join(f'{v:.4f}' for v in pre)}). Every comparison is paired (same start, same fine-tuning seed) and "
        "given as the mean difference with its 95% t-interval over the pairs.",
        "",
    ]
    section_upcycling(runs, figures, lines, results)
    section_overfitting(runs, figures, lines, results)
    section_zloss(runs, figures, lines, results)
    section_expert_choice(runs, figures, lines, results)
    section_sweeps(runs, figures, lines, results)
    section_modes(runs, figures, lines, results)
    results["timing"] = spent
    lines += [
        "## Time per section (measured in this run)",
        "",
        "| section | runs | wall seconds | training CPU seconds |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {row['runs']} | {row['wall_seconds']:.0f} | {row['training_cpu_seconds']:.0f} |"
        for name, row in spent.items()
    ]
    lines += ["", "## Per-run tables and curves (`hf-moe compare`)", ""]
    for section in ("upcycling", "overfitting", "zloss_high_lr", "expert_choice"):
        folders = sorted(p.parent for p in (runs.folder / section).glob(f"**/{FINISHED}"))
        if not folders:
            continue
        compare_runs(folders, figures / f"compare_{section}", overwrite=True)
        lines += [
            f"### {section}",
            "",
            (figures / f"compare_{section}" / "comparison.md").read_text(),
            f"![{section}]({FOLDER}/compare_{section}/loss_curves.png)",
            "",
        ]
    record = provenance(configuration(s), runs.run_digests())  # last: every module the report used is loaded
    record["mode"] = {"quick": quick, "scale": scale}
    if not record["runs_match_code"]:
        changed = ", ".join(record["files_changed_since_the_runs"])
        lines[2:2] = [f"**WARNING: the runs were made by other code than this report's** (changed: {changed}).", ""]
    # Figures are referenced from study.md, one folder down.
    text = "\n".join(lines)
    for png in figures.glob("*.png"):
        text = text.replace(f"]({png.name})", f"]({FOLDER}/{png.name})")
    results["provenance"] = record
    (figures / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (target / REPORT).write_text(text)
    return target / REPORT


def publish(report: Path, docs: Path) -> None:
    """Put a finished report in ``docs`` (``docs/study.md``, ``docs/study/``): the new folder is staged next to the
    old one and swapped in, so a failure leaves the previous report whole."""
    staged = docs / f".{FOLDER}.new"
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(report.parent / FOLDER, staged)
    shutil.copyfile(report, staged / REPORT)
    old = docs / f".{FOLDER}.old"
    if old.exists():
        shutil.rmtree(old)
    if (docs / FOLDER).exists():
        (docs / FOLDER).rename(old)
    (staged / REPORT).replace(docs / REPORT)
    staged.rename(docs / FOLDER)
    if old.exists():
        shutil.rmtree(old)
