"""Run the upcycling study from the repository root:

    python -m studies.upcycling --output_dir hf_moe_study            # full study, about 25 minutes on 2 idle cores
    python -m studies.upcycling --output_dir /tmp/study --quick      # pipeline check, under 2 minutes

An interrupted study resumes: running the command again reuses the finished runs. A finished study (its report
written) is kept unless ``--overwrite``, which starts over; ``--report_only`` rewrites the report from the runs
finished so far.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from . import __doc__ as STUDY_DOC
from .data import FULL, QUICK, prepare_data
from .report import REPORT, write_report
from .runs import FINISHED, Runs


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m studies.upcycling", description=STUDY_DOC.splitlines()[0])
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
        runs = Runs(output, size, prepare_data(output, size, output / "dense_init"))
        path = write_report(runs, args.quick)
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
    runs = Runs(output, size, prepare_data(output, size, output / "dense_init"))
    runs.pretrain()
    # Order: one seed of everything first, so an interrupted study already has every section.
    runs.upcycling(0)
    runs.overfitting(0)
    runs.expert_choice()
    for seed in range(1, size["seeds"]):
        runs.upcycling(seed)
    if not args.quick:
        runs.zloss_high_lr()
    for seed in range(1, size["cls_seeds"]):
        runs.overfitting(seed)
    path = write_report(runs, args.quick)
    print(f"[study] report: {path} ({(time.time() - started) / 60:.1f} minutes)")
    return path


if __name__ == "__main__":
    main()
