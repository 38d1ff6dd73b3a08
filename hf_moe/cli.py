"""The ``hf-moe`` command line: one argparse subcommand per task.

    hf-moe upcycle SOURCE OUTPUT_DIR --routing switch --num-experts 8 --top-k 2 --verify
    hf-moe upcycle SOURCE OUTPUT_DIR --num-experts 8 --plan --fsdp-size 8   # sizes and memory; writes nothing
    hf-moe export MOE_DIR OUTPUT_DIR        # hf_moe -> native transformers MoE (qwen3_moe, mixtral, ...)
    hf-moe import NATIVE_DIR OUTPUT_DIR     # native MoE -> hf_moe
    hf-moe compare RUN_DIR [RUN_DIR ...] --output comparison/

A subcommand is a function ``add_<name>_parser(subparsers)`` that registers its arguments and
sets ``handler``; `main` dispatches to it and turns user errors into a message and exit status.
"""

import argparse
import json
import math
import re
import sys
import warnings

from transformers.utils import CONFIG_NAME

from .checkpoints.units import DTYPES
from .upcycling import EXPERT_INITS, ROUTINGS, upcycle_checkpoint
from .upcycling.convert import FORMATS
from .upcycling.export import export_checkpoint, import_checkpoint
from .upcycling.native import FAMILIES_BY_NATIVE, supported_mappings
from .upcycling.plan import plan_upcycling
from .upcycling.settings import DEFAULT_NOISE_STD, UPCYCLING_TOP_K, UpcyclingWarning
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


def _finite_float(text: str) -> float:
    """A number option: ``float`` would also take nan and inf, which pass every range check."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _optional_float(text: str):
    if text.lower() == "none":
        return None
    try:
        return _finite_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a finite number or 'none', got {text!r}") from None


# MoE config fields exposed as flags: (flag, config field, type, help). Only flags given on the
# command line are passed on; the config class validates them and rejects the ones its routing lacks.
CONFIG_FLAGS = (
    (
        "--top-k",
        "num_experts_per_tok",
        int,
        f"switch: experts per token, k of top-k (default {UPCYCLING_TOP_K}: with renormalised gates the model "
        "computes the dense function at step 0 and the routers learn from the task loss; top-1 with "
        "renormalised gates gives the routers no task-loss gradient and warns)",
    ),
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
        _finite_float,
        "switch: multiplicative router-input jitter epsilon, training only (default 0)",
    ),
    (
        "--router-aux-loss-coef",
        "router_aux_loss_coef",
        _finite_float,
        "switch: load-balancing loss coefficient (default 0.01)",
    ),
    ("--router-z-loss-coef", "router_z_loss_coef", _finite_float, "router z-loss coefficient (default 0.001)"),
    (
        "--expert-dropout",
        "expert_dropout",
        _finite_float,
        "dropout on the experts' hidden activation, training only (default 0; Switch fine-tuning uses 0.4)",
    ),
    ("--router-init-std", "router_init_std", _finite_float, "std of the routers' normal initialisation (default 0.02)"),
    (
        "--inference-routing",
        "inference_routing",
        str,
        "expert_choice: 'threshold' (causal, default for causal LM) or 'expert_choice' (default for base/classifier)",
    ),
    (
        "--threshold-ema-decay",
        "threshold_ema_decay",
        _finite_float,
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
            f"--expert-init copy, renormalised top-k (the default here, top-{UPCYCLING_TOP_K}) and dropless "
            "evaluation the MoE model computes exactly the dense function. Only tokenizer and generation data "
            "files are copied from SOURCE, never code."
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
        type=_finite_float,
        default=None,
        help=f"--expert-init noise: noise std relative to each weight matrix's std (default {DEFAULT_NOISE_STD})",
    )
    parser.add_argument(
        "--drop-ratio",
        type=_finite_float,
        default=None,
        help="--expert-init drop: fraction of intermediate neurons re-initialised per expert (default 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of routers, noise and dropped neurons (default 0)")
    parser.add_argument(
        "--norm-topk-prob",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="switch: renormalise the top-k gates to sum 1 (default on for upcycling, which preserves the dense "
        "function); --no-norm-topk-prob keeps Switch's raw gate (the router learns, but step 0 is not exact)",
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
    parser.add_argument(
        "--allow-tokenizer-remote-code",
        action="store_true",
        help="convert a SOURCE whose tokenizer needs custom code (auto_map); its code is still not copied, "
        "and the model card says so (default: refuse such a SOURCE)",
    )
    parser.add_argument(
        "--format",
        choices=list(FORMATS),
        default="hf_moe",
        help="hf_moe: switch_moe/expert_choice_moe checkpoint (default); native: the native transformers MoE "
        f"architecture, loadable without hf_moe, for settings that have one ({supported_mappings()})",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="write nothing: print, from SOURCE's config alone, the total and active parameters, the output size, "
        "the conversion's peak memory and the per-rank training memory (with --ep-size/--fsdp-size)",
    )
    parser.add_argument("--ep-size", type=int, default=None, help="--plan: expert-parallel ranks of training (1)")
    parser.add_argument("--fsdp-size", type=int, default=None, help="--plan: FSDP ranks of training (1)")
    parser.set_defaults(handler=run_upcycle, flag_names=flag_names(parser))


def run_upcycle(args: argparse.Namespace) -> int:
    if args.noise_std is not None and args.expert_init != "noise":
        raise ValueError(f"--noise-std applies to --expert-init noise only, got --expert-init {args.expert_init}")
    if args.drop_ratio is not None and args.expert_init != "drop":
        raise ValueError(f"--drop-ratio applies to --expert-init drop only, got --expert-init {args.expert_init}")
    overrides = {field: getattr(args, field) for _, field, _, _ in CONFIG_FLAGS if hasattr(args, field)}
    if args.norm_topk_prob is not None:
        overrides["norm_topk_prob"] = args.norm_topk_prob
    # The options the conversion and its plan share.
    options = dict(
        routing=args.routing,
        num_experts=args.num_experts,
        moe_layers=args.moe_layers,
        expert_init=args.expert_init,
        seed=args.seed,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        verify=args.verify,
        format=args.format,
        revision=args.revision,
        **{k: v for k, v in (("noise_std", args.noise_std), ("drop_ratio", args.drop_ratio)) if v is not None},
        **overrides,
    )
    if args.plan:
        return _print_plan(args, options)
    for flag, value in (("--ep-size", args.ep_size), ("--fsdp-size", args.fsdp_size)):
        if value is not None:
            raise ValueError(f"{flag} applies to --plan only, got {flag} {value} without --plan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UpcyclingWarning)
        output = upcycle_checkpoint(
            args.source,
            args.output_dir,
            overwrite=args.overwrite,
            progress=args.progress,
            allow_tokenizer_remote_code=args.allow_tokenizer_remote_code,
            **options,
        )
    for warning in caught:
        if issubclass(warning.category, UpcyclingWarning):
            print(f"hf-moe: warning: {in_cli_terms(str(warning.message), args.flag_names)}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    config = json.loads((output / CONFIG_NAME).read_text())
    upcycling = config["hf_moe_export"]["upcycling"] if args.format == "native" else config["upcycling"]
    if upcycling.get("verification") is not None:
        print(VerificationReport.from_dict(upcycling["verification"]).summary())
    if args.format == "native":
        _print_native_report(config["hf_moe_export"].get("verification"), config["model_type"])
    print(f"Wrote {output}")
    return 0


def _print_plan(args: argparse.Namespace, options: dict) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpcyclingWarning)  # the conversion itself reports them
        plan = plan_upcycling(
            args.source,
            ep_size=1 if args.ep_size is None else args.ep_size,
            fsdp_size=1 if args.fsdp_size is None else args.fsdp_size,
            **options,
        )
    print(plan.summary())
    return 0


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Python argument name -> how the command line spells it (``num_experts_per_tok`` -> ``--top-k``)."""
    names = {}
    for action in parser._actions:
        if action.option_strings:
            names[action.dest] = next(
                (o for o in action.option_strings if o.startswith("--")), action.option_strings[0]
            )
        elif action.metavar:
            names[action.dest] = action.metavar
    names.pop("help", None)
    return names


def in_cli_terms(message: str, names: dict[str, str]) -> str:
    """Rewrite an API error in the words of the command line: ``overwrite=True`` -> ``--overwrite``,
    ``num_experts_per_tok must`` -> ``--top-k must``, ``output_dir='x'`` -> ``OUTPUT_DIR 'x'``.

    Names with an underscore are rewritten wherever they stand; plain words (``seed``, ``routing``,
    ``source``) only in ``name=value`` form or before "must", where they cannot be ordinary prose.
    """
    if not names:
        return message
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))

    def replace(match: re.Match) -> str:
        name, value = match["name"], match["value"]
        flag = names[name]
        if value is None:
            return flag if "_" in name or match["after"] is not None else match[0]
        if value in ("True", "False") and flag.startswith("--"):  # store_true / BooleanOptionalAction flags
            return flag if value == "True" else f"--no-{flag[2:]}"
        return f"{flag} {value}"

    pattern = rf"(?<![\w-])(?P<name>{alternatives})(?:=(?P<value>[^\s,;:)]+)|(?P<after>(?= must\b))|\b)"
    return re.sub(pattern, replace, message)


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="write an hf_moe checkpoint in a native transformers MoE architecture (qwen3_moe, mixtral, ...)",
        description=(
            "Write an hf_moe checkpoint as a native transformers MoE checkpoint that loads with the stock Auto "
            "classes, without hf_moe or trust_remote_code, and that serving engines (vLLM, SGLang, llama.cpp) know. "
            "Tensors are renamed and split per expert, streaming; the output computes exactly the same function "
            f"(verified). Supported mappings: {supported_mappings()}. Expert Choice routing and an evaluation "
            "capacity factor (token dropping) have no native counterpart."
        ),
    )
    parser.add_argument("source", metavar="MOE_DIR", help="hf_moe checkpoint directory, or a Hub id")
    _add_native_options(parser)
    parser.set_defaults(handler=run_export, flag_names=flag_names(parser))
    return parser


def add_import_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "import",
        help="turn a native transformers MoE checkpoint (qwen3_moe, mixtral, ...) into an hf_moe checkpoint",
        description=(
            "Turn a native transformers MoE checkpoint into an hf_moe switch_moe checkpoint computing the same "
            "function (dropless, as the native model), so that the hf_moe recipes (router z-loss, expert dropout, "
            f"capacity factors, routing health) apply. Supported: {list(FAMILIES_BY_NATIVE)}. Shared experts and "
            "experts of another size than the dense layers' MLP are refused."
        ),
    )
    parser.add_argument("source", metavar="NATIVE_DIR", help="native MoE checkpoint directory, or a Hub id")
    _add_native_options(parser)
    parser.set_defaults(handler=run_import, flag_names=flag_names(parser))
    return parser


def _add_native_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="where to write (must not exist or be empty)")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)"
    )
    parser.add_argument("--revision", default=None, help="Hub revision (Hub ids only)")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the verification (every tensor bit for bit, and both models' logits when they fit in memory)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR (only once the new one is complete)"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def _native_options(args: argparse.Namespace) -> dict:
    return dict(
        max_shard_size=args.max_shard_size,
        verify=args.verify,
        overwrite=args.overwrite,
        revision=args.revision,
        progress=args.progress,
    )


def _print_native_report(report: dict | None, model_type: str) -> None:
    if report is None:
        return
    deviation = report["model_max_relative_deviation"]
    model = (
        f"whole-model logits max relative deviation {deviation:.3e}"
        if deviation is not None
        else f"whole-model comparison skipped: {report['model_comparison_skipped']}"
    )
    print(f"Verification ({model_type}): tensors bit-exact: {report['tensors_bit_exact']}; {model}; PASSED")


def run_export(args: argparse.Namespace) -> int:
    output = export_checkpoint(args.source, args.output_dir, **_native_options(args))
    config = json.loads((output / CONFIG_NAME).read_text())
    _print_native_report(config["hf_moe_export"].get("verification"), config["model_type"])
    print(f"Wrote {output} ({config['architectures'][0]})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    output = import_checkpoint(args.source, args.output_dir, **_native_options(args))
    config = json.loads((output / CONFIG_NAME).read_text())
    _print_native_report(config["imported"].get("verification"), config["model_type"])
    print(f"Wrote {output} ({config['architectures'][0]})")
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
    parser.set_defaults(handler=run_compare, flag_names=flag_names(parser))
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
    add_export_parser(subparsers)
    add_import_parser(subparsers)
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
    except (ValueError, TypeError, OSError, ImportError) as error:  # files, disk space, a missing extra
        print(f"{parser.prog}: error: {in_cli_terms(str(error), getattr(args, 'flag_names', {}))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; nothing was written to the output directory", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
