"""The ``hf-moe`` command line: one argparse subcommand per task.

    hf-moe upcycle SOURCE OUTPUT_DIR --routing switch --num-experts 8 --top-k 2 --verify
    hf-moe compare RUN_DIR [RUN_DIR ...] --output comparison/

A subcommand is a function ``add_<name>_parser(subparsers)`` that registers its arguments and
sets ``handler``; `main` dispatches to it and turns user errors into a message and exit status.
"""

import argparse
import json
import sys

from transformers.utils import CONFIG_NAME

from .upcycling import EXPERT_INITS, ROUTINGS, upcycle_checkpoint
from .upcycling.convert import DTYPES
from .upcycling.settings import DEFAULT_NOISE_STD
from .upcycling.verify import VerificationError, VerificationReport

# Exit statuses: user error (bad option or input), verification failure, interrupted.
EXIT_USER_ERROR, EXIT_VERIFICATION_FAILED, EXIT_INTERRUPTED = 2, 3, 130


def _moe_layers(text: str):
    if text in ("every_other", "all", "last_half"):
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected every_other, all, last_half or comma-separated layer indices such as 0,2,5; got {text!r}"
        ) from None


def _optional_float(text: str):
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


# MoE config fields exposed as flags: (flag, config field, type, help). Only flags given on the
# command line are passed on; the config class validates them and rejects the ones its routing lacks.
CONFIG_FLAGS = (
    ("--top-k", "num_experts_per_tok", int, "switch: experts per token, k of top-k (config default 1)"),
    (
        "--capacity-factor",
        "capacity_factor",
        _optional_float,
        "switch: training capacity factor, 'none' = dropless (default 1.25); "
        "expert_choice: c, tokens per expert = c*seq_len/E (default 2.0)",
    ),
    (
        "--eval-capacity-factor",
        "eval_capacity_factor",
        _optional_float,
        "switch: evaluation/generation capacity factor (default none = dropless)",
    ),
    (
        "--router-jitter-noise",
        "router_jitter_noise",
        float,
        "switch: multiplicative router-input jitter epsilon, training only (default 0)",
    ),
    ("--router-aux-loss-coef", "router_aux_loss_coef", float, "switch: load-balancing loss coefficient (default 0.01)"),
    ("--router-z-loss-coef", "router_z_loss_coef", float, "router z-loss coefficient (default 0.001)"),
    (
        "--expert-dropout",
        "expert_dropout",
        float,
        "dropout on the experts' hidden activation, training only (default 0; Switch fine-tuning uses 0.4)",
    ),
    ("--router-init-std", "router_init_std", float, "std of the routers' normal initialisation (default 0.02)"),
    (
        "--inference-routing",
        "inference_routing",
        str,
        "expert_choice: 'threshold' (causal, default for causal LM) or 'expert_choice' (default for base/classifier)",
    ),
    (
        "--threshold-ema-decay",
        "threshold_ema_decay",
        float,
        "expert_choice: decay of the running score thresholds (default 0.99)",
    ),
)


def add_upcycle_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "upcycle",
        help="convert a dense checkpoint into a sparse MoE checkpoint (sparse upcycling)",
        description=(
            "Convert a dense transformers checkpoint into an hf_moe Mixture-of-Experts checkpoint, streaming tensor by "
            "tensor with bounded memory. Experts start from the dense MLP, routers are freshly initialised. With "
            "--expert-init copy, renormalised top-k (the default here) and dropless evaluation the MoE model computes "
            "exactly the dense function."
        ),
    )
    configure_upcycle_parser(parser)
    return parser


def configure_upcycle_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", metavar="SOURCE", help="dense checkpoint directory, or a Hub id (from the local cache when offline)"
    )
    parser.add_argument(
        "output_dir", metavar="OUTPUT_DIR", help="where to write the MoE checkpoint (must not exist or be empty)"
    )
    parser.add_argument(
        "--routing",
        choices=list(ROUTINGS),
        default="switch",
        help="switch: token choice (top-k); expert_choice: each expert picks its tokens (default switch)",
    )
    parser.add_argument("--num-experts", type=int, default=8, help="experts per MoE layer (default 8)")
    parser.add_argument(
        "--moe-layers",
        type=_moe_layers,
        default="every_other",
        help="layers that become MoE: every_other (odd layers, default), all, last_half, or indices such as 0,2,5",
    )
    parser.add_argument(
        "--expert-init",
        choices=list(EXPERT_INITS),
        default="copy",
        help="copy: every expert the dense MLP; noise: copy plus Gaussian noise; drop: Drop-Upcycling (default copy)",
    )
    parser.add_argument(
        "--noise-std",
        type=float,
        default=None,
        help=f"--expert-init noise: noise std relative to each weight matrix's std (default {DEFAULT_NOISE_STD})",
    )
    parser.add_argument(
        "--drop-ratio",
        type=float,
        default=None,
        help="--expert-init drop: fraction of intermediate neurons re-initialised per expert (default 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of routers, noise and dropped neurons (default 0)")
    parser.add_argument(
        "--norm-topk-prob",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="switch: renormalise the top-k gates to sum 1 (default on for upcycling, which preserves the dense "
        "function); --no-norm-topk-prob keeps Switch's raw gate",
    )
    for flag, field, kind, help_text in CONFIG_FLAGS:
        parser.add_argument(flag, dest=field, type=kind, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="dtype of floating tensors (default: keep the source's)"
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)"
    )
    parser.add_argument("--revision", default=None, help="Hub revision (Hub ids only)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare every MoE layer and the whole model with the dense model; fails if function-preserving "
        "settings deviate by more than 1e-5 (relative, float32)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR (only once the new one is complete)"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.set_defaults(handler=run_upcycle)


def run_upcycle(args: argparse.Namespace) -> int:
    if args.noise_std is not None and args.expert_init != "noise":
        raise ValueError(f"--noise-std applies to --expert-init noise only, got --expert-init {args.expert_init}")
    if args.drop_ratio is not None and args.expert_init != "drop":
        raise ValueError(f"--drop-ratio applies to --expert-init drop only, got --expert-init {args.expert_init}")
    overrides = {field: getattr(args, field) for _, field, _, _ in CONFIG_FLAGS if hasattr(args, field)}
    if args.norm_topk_prob is not None:
        overrides["norm_topk_prob"] = args.norm_topk_prob
    options = {"noise_std": args.noise_std, "drop_ratio": args.drop_ratio}
    output = upcycle_checkpoint(
        args.source,
        args.output_dir,
        routing=args.routing,
        num_experts=args.num_experts,
        moe_layers=args.moe_layers,
        expert_init=args.expert_init,
        seed=args.seed,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        verify=args.verify,
        overwrite=args.overwrite,
        revision=args.revision,
        progress=args.progress,
        **{k: v for k, v in options.items() if v is not None},
        **overrides,
    )
    verification = json.loads((output / CONFIG_NAME).read_text())["upcycling"].get("verification")
    if verification is not None:
        print(VerificationReport.from_dict(verification).summary())
    print(f"Wrote {output}")
    return 0


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        help="overlay the loss curves and tabulate the final metrics of fine-tuning runs",
        description=(
            "Compare transformers Trainer / TRL runs (their output_dir, or one of its checkpoint-* folders): final and "
            "best evaluation loss, perplexity, train/validation gap, time per step, tokens per second and total / "
            "active parameters, as a Markdown table; with --output also comparison.md and loss_curves.png there."
        ),
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a Trainer run")
    parser.add_argument(
        "--output", default=None, help="folder for comparison.md and loss_curves.png (default: print only)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace comparison.md / loss_curves.png in --output")
    parser.set_defaults(handler=run_compare)
    return parser


def run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .compare import COMPARISON_PLOT, COMPARISON_TABLE, compare_runs

    for run_dir in args.run_dirs:
        if not Path(run_dir).is_dir():
            raise FileNotFoundError(f"RUN_DIR {run_dir}: no such folder")
    if args.output is not None and not args.overwrite:
        for name in (COMPARISON_TABLE, COMPARISON_PLOT):
            if (Path(args.output) / name).exists():
                raise FileExistsError(f"--output {args.output} already holds {name}; pass --overwrite to replace it")
    print(compare_runs(args.run_dirs, args.output, overwrite=args.overwrite), end="")
    if args.output is not None:
        print(f"Wrote {Path(args.output) / COMPARISON_TABLE} and {Path(args.output) / COMPARISON_PLOT}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-moe", description="hf_moe: sparse Mixture-of-Experts for Hugging Face transformers"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_upcycle_parser(subparsers)
    add_compare_parser(subparsers)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one command; returns the exit status (the console script passes it to sys.exit)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except VerificationError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_VERIFICATION_FAILED
    except (ValueError, TypeError, OSError) as error:  # FileNotFoundError, FileExistsError, disk space
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; nothing was written to the output directory", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
