"""The report: ``report/README.md`` (every section, with the per-section overlays made by `hf_moe.compare`),
``report/results.json`` and the figures."""

import json
import os
import platform
import sysconfig
from datetime import UTC, datetime
from pathlib import Path

import torch

from hf_moe.compare import compare_runs, load_run

from .runs import FINISHED, RUN_SECONDS, Runs
from .sections import section_expert_choice, section_overfitting, section_upcycling, section_zloss

REPORT = "README.md"


def write_report(runs: Runs, quick: bool) -> Path:
    import transformers
    import trl

    s = runs.size
    report = runs.output / "report"
    report.mkdir(parents=True, exist_ok=True)
    upcycling, overfitting = runs.folder / "upcycling", runs.folder / "overfitting"
    seeds = [
        seed
        for seed in range(s["seeds"])
        if all((upcycling / f"{n}_s{seed}" / FINISHED).is_file() for n in ("dense", "switch", "switch_zloss0"))
    ]
    cls_seeds = [
        seed for seed in range(s["cls_seeds"]) if (overfitting / f"switch_non_moe_s{seed}" / FINISHED).is_file()
    ]
    stress_done = (runs.folder / "zloss_high_lr" / f"switch_lr{s['stress_lr']:g}" / FINISHED).is_file()
    complete = len(seeds) == s["seeds"] and len(cls_seeds) == s["cls_seeds"] and (quick or stress_done)
    results: dict = {"mode": "quick" if quick else "full", "complete": complete, "sizes": s}
    pre = load_run(runs.dense)
    run_seconds = sum(float(p.read_text()) for p in runs.folder.glob(f"**/{RUN_SECONDS}"))
    title = "quick mode: a pipeline check, not evidence" if quick else "full mode"
    lines = [
        f"# hf_moe study ({title}{'' if complete else '; PARTIAL: not every planned run finished'})",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by "
        f"`python -m studies.upcycling{' --quick' if quick else ''}` "
        f"on {platform.machine()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads), "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}. The runs took {run_seconds / 60:.1f} minutes of wall time.",
        "",
        f"Data: the standard library's top-level modules ({sysconfig.get_paths()['stdlib']}), every 8th file held out "
        f"for validation; a byte-level BPE tokenizer of {len(runs.data.tokenizer)} tokens. Dense start: llama, "
        f"{s['layers']} layers, hidden {s['hidden_size']}, pre-trained {s['pretrain_steps']} steps through the CLM "
        f"recipe (final validation loss {pre.last('eval_validation_task_loss'):.4f}).",
        "",
    ]
    section_upcycling(runs, report, seeds, lines, results)
    section_overfitting(runs, report, cls_seeds, lines, results)
    section_zloss(runs, report, seeds, lines, results)
    section_expert_choice(runs, report, lines, results)
    # Per-section overlays with the compare tool (what a user would run on their own runs).
    lines += ["## Per-run tables and curves (`hf-moe compare`)", ""]
    for section in ("upcycling", "overfitting", "zloss_high_lr", "expert_choice"):
        folders = sorted(p for p in (runs.folder / section).glob("*") if (p / FINISHED).is_file())
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
