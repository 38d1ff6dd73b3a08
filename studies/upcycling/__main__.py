"""Run the upcycling study from the repository root:

    python -m studies.upcycling --output_dir hf_moe_study --publish docs   # full study on CPU, then docs/study.md
    python -m studies.upcycling --output_dir /tmp/study --quick            # pipeline check, about 2 minutes
    python -m studies.upcycling --output_dir hf_moe_scale --scale          # >= 100M parameters, one CUDA GPU

An interrupted study resumes: running the command again reuses the finished runs. A finished study (its report
written) is kept unless ``--overwrite``, which starts over; ``--report_only`` rewrites the report from the runs
finished so far (marked partial if some are missing). ``--publish DIR`` puts the finished report in
``DIR/study.md`` and ``DIR/study/``, replacing the previous one only once the new one is complete.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from . import __doc__ as STUDY_DOC
from .data import prepare_data, sizes
from .report import REPORT, publish, write_report
from .runs import Runs


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m studies.upcycling", description=STUDY_DOC.splitlines()[0])
    parser.add_argument("--output_dir", default="hf_moe_study")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline in about 2 minutes")
    parser.add_argument("--scale", action="store_true", help=">= 100M parameters on one CUDA GPU (with --quick: toy)")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier study in --output_dir, start over")
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="train nothing: (re)write the report from the runs finished so far (marked partial if some are missing)",
    )
    parser.add_argument("--publish", metavar="DIR", default=None, help="put the report in DIR/study.md and DIR/study/")
    args = parser.parse_args(argv)
    size = sizes(args.quick, args.scale)
    if not size["use_cpu"]:
        import torch

        if not torch.cuda.is_available():
            parser.error("--scale without --quick needs a CUDA GPU; none is visible (--quick --scale runs on CPU)")
    output = Path(args.output_dir).resolve()
    report = output / "report" / REPORT
    if args.report_only:
        if not (output / "runs" / "pretrain" / "start0" / "finetune_config.yaml").is_file():
            raise SystemExit(f"--report_only: {output} holds no finished study runs")
        runs = Runs(output, size, prepare_data(output, size, output / "dense_init" / "start0"))
        path = write_report(runs, args.quick, args.scale)
    else:
        if output.exists() and args.overwrite:
            shutil.rmtree(output)
        if report.is_file():
            raise SystemExit(f"--output_dir {output} holds a finished study; pass --overwrite to run it again")
        mode_file = output / "study_sizes.json"
        if mode_file.is_file() and json.loads(mode_file.read_text()) != size:
            raise SystemExit(
                f"--output_dir {output} holds runs of a study with other sizes (--quick or --scale differ); "
                "choose another folder or pass --overwrite"
            )
        output.mkdir(parents=True, exist_ok=True)
        mode_file.write_text(json.dumps(size))
        started = time.time()
        runs = Runs(output, size, prepare_data(output, size, output / "dense_init" / "start0"))
        runs.train_all()
        path = write_report(runs, args.quick, args.scale)
        print(f"[study] {(time.time() - started) / 60:.1f} minutes")
    print(f"[study] report: {path}")
    if args.publish:
        publish(path, Path(args.publish))
        print(f"[study] published in {args.publish}")
    return path


if __name__ == "__main__":
    main()
