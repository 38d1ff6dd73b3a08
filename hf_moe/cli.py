"""The ``hf-moe`` command line: one subcommand per task.

    hf-moe upcycle SOURCE OUTPUT_DIR --routing switch --num-experts 8 --num-experts-per-tok 2 --verify
    hf-moe upcycle SOURCE OUTPUT_DIR --num-experts 8 --plan --fsdp-size 8   # sizes and memory; writes nothing
    hf-moe export MOE_DIR OUTPUT_DIR        # hf_moe -> native transformers MoE (qwen3_moe, mixtral, ...)
    hf-moe import NATIVE_DIR OUTPUT_DIR     # native MoE -> hf_moe
    hf-moe compare RUN_DIR [RUN_DIR ...] --output comparison/

A subcommand is a function ``add_<name>_parser(subparsers)`` that registers its arguments and
sets ``handler``; `main` dispatches to it and turns user errors into a message and exit status.
The options of every subcommand, their help and defaults are generated from the option dataclasses
(`UpcyclingSettings`, `CheckpointOptions`, `PlanOptions`; `NativeOptions`; `CompareOptions`)
by transformers' `HfArgumentParser`, the way TRL's ``trl`` command builds its subcommands; errors
name options as the parser spells them (`hf_moe.options.parser_spelling`).
"""

import argparse
import copy
import dataclasses
import json
import sys
import typing
import warnings

from transformers import HfArgumentParser
from transformers.utils import CONFIG_NAME

from .options import in_terms, parser_spelling
from .upcycling import upcycle_checkpoint
from .upcycling.export import export_checkpoint, import_checkpoint
from .upcycling.native import FAMILIES_BY_NATIVE, supported_mappings
from .upcycling.plan import plan_upcycling
from .upcycling.settings import (
    UPCYCLING_TOP_K,
    CheckpointOptions,
    NativeOptions,
    PlanOptions,
    RoutingOptions,
    UpcyclingSettings,
    UpcyclingWarning,
    routing_defaults,
)
from .upcycling.verify import VerificationError, VerificationReport

# Exit statuses: user error (bad option or input), verification failure, interrupted.
EXIT_USER_ERROR, EXIT_VERIFICATION_FAILED, EXIT_INTERRUPTED = 2, 3, 130
UPCYCLE_OPTIONS = (UpcyclingSettings, CheckpointOptions, PlanOptions)
ROUTING_FIELDS = {f.name for f in dataclasses.fields(RoutingOptions)}


class OptionsParser(HfArgumentParser):
    """`HfArgumentParser` (flags, types, defaults and help from the dataclass fields), where an option that
    takes text or another type (``moe_layers: str | list[int]``, ``capacity_factor: float | str | None``)
    is read as text: the dataclass parses it (``1,3`` -> ``[1, 3]``, ``1.5`` -> ``1.5``)."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        kinds = typing.get_args(field.type)
        if str in kinds and len(set(kinds) - {type(None)}) > 1:
            field = copy.copy(field)
            field.type = str | None if type(None) in kinds else str
        if field.name in ROUTING_FIELDS:  # unset, the routing's own default: say which, from its config class
            field = copy.copy(field)
            field.metadata = {
                **field.metadata,
                "help": f"{field.metadata['help']} (unset: {routing_defaults(field.name)})",
            }
        HfArgumentParser._parse_dataclass_field(parser, field)


def dataclasses_from(args: argparse.Namespace, classes) -> list:
    """One instance of each dataclass from the parsed ``args`` (what `HfArgumentParser` does per class)."""
    return [cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init}) for cls in classes]


def add_upcycle_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "upcycle",
        dataclass_types=UPCYCLE_OPTIONS,
        help="convert a dense checkpoint into a sparse MoE checkpoint (sparse upcycling)",
        description=UPCYCLE_DESCRIPTION,
    )
    configure_upcycle_parser(parser)
    return parser


UPCYCLE_DESCRIPTION = (
    "Convert a dense transformers checkpoint into an hf_moe Mixture-of-Experts checkpoint, streaming tensor by "
    "tensor with bounded memory. Experts start from the dense MLP, routers are freshly initialised. With "
    f"--expert-init copy, renormalised top-k (the default here, top-{UPCYCLING_TOP_K}) and dropless "
    "evaluation the MoE model computes exactly the dense function. Only tokenizer and generation data "
    "files are copied from SOURCE, never code. Routing options left unset take the routing's defaults."
)


def configure_upcycle_parser(parser: argparse.ArgumentParser) -> None:
    """The positional arguments of ``upcycle`` on a parser built from `UPCYCLE_OPTIONS`."""
    parser.add_argument(
        "source", metavar="SOURCE", help="dense checkpoint directory, or a Hub id (from the local cache when offline)"
    )
    parser.add_argument(
        "output_dir", metavar="OUTPUT_DIR", help="where to write the MoE checkpoint (must not exist or be empty)"
    )
    parser.set_defaults(handler=run_upcycle, spelling=parser_spelling(parser))


def run_upcycle(args: argparse.Namespace) -> int:
    settings, checkpoint, layout = dataclasses_from(args, UPCYCLE_OPTIONS)
    if layout.plan:
        return _print_plan(args.source, settings, checkpoint, layout)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UpcyclingWarning)
        output = upcycle_checkpoint(args.source, args.output_dir, settings, **dataclasses.asdict(checkpoint))
    for warning in caught:
        if issubclass(warning.category, UpcyclingWarning):
            print(f"hf-moe: warning: {in_terms(warning.message, args.spelling)}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    config = json.loads((output / CONFIG_NAME).read_text())
    native = checkpoint.format == "native"
    upcycling = config["hf_moe_export"]["upcycling"] if native else config["upcycling"]
    if upcycling.get("verification") is not None:
        print(VerificationReport.from_dict(upcycling["verification"]).summary())
    if native:
        _print_native_report(config["hf_moe_export"].get("verification"), config["model_type"])
    print(f"Wrote {output}")
    return 0


def _print_plan(source, settings, checkpoint: CheckpointOptions, layout: PlanOptions) -> int:
    options = {**dataclasses.asdict(checkpoint), "ep_size": layout.ep_size, "fsdp_size": layout.fsdp_size}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UpcyclingWarning)  # the conversion itself reports them
        plan = plan_upcycling(source, settings, **options)
    print(plan.summary())
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        dataclass_types=[NativeOptions],
        help="write an hf_moe checkpoint in a native transformers MoE architecture (qwen3_moe, mixtral, ...)",
        description=(
            "Write an hf_moe checkpoint as a native transformers MoE checkpoint that loads with the stock Auto "
            "classes, without hf_moe or trust_remote_code, and that serving engines (vLLM, SGLang, llama.cpp) know. "
            "Tensors are renamed and split per expert, streaming; the output computes exactly the same function "
            f"(verified). Supported mappings: {supported_mappings()}. Expert Choice routing and an evaluation "
            "capacity factor (token dropping) have no native counterpart; auxiliary-loss-free checkpoints export "
            "with their selection biases as e_score_correction_bias."
        ),
    )
    parser.add_argument("source", metavar="MOE_DIR", help="hf_moe checkpoint directory, or a Hub id")
    _add_native_options(parser)
    parser.set_defaults(handler=run_export, spelling=parser_spelling(parser))
    return parser


def add_import_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "import",
        dataclass_types=[NativeOptions],
        help="turn a native transformers MoE checkpoint (qwen3_moe, mixtral, ...) into an hf_moe checkpoint",
        description=(
            "Turn a native transformers MoE checkpoint into an hf_moe checkpoint computing the same function "
            "(dropless, as the native model), so that the hf_moe recipes (router z-loss, expert dropout, capacity "
            f"factors, routing health) apply. Supported: {list(FAMILIES_BY_NATIVE)}: the softmax-routed families "
            "become switch_moe checkpoints, the bias-routed glm4_moe and dots1 aux_free_moe checkpoints whose "
            "selection biases are their e_score_correction_bias. What hf_moe does not compute (group-limited routing, "
            "routed_scaling_factor other than 1, partial rotary embeddings) is refused."
        ),
    )
    parser.add_argument("source", metavar="NATIVE_DIR", help="native MoE checkpoint directory, or a Hub id")
    _add_native_options(parser)
    parser.set_defaults(handler=run_import, spelling=parser_spelling(parser))
    return parser


def _add_native_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="where to write (must not exist or be empty)")


def _native_options(args: argparse.Namespace) -> dict:
    return dataclasses.asdict(dataclasses_from(args, [NativeOptions])[0])


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


@dataclasses.dataclass
class CompareOptions:
    """The options of ``hf-moe compare`` (its positional RUN_DIRs are added by `add_compare_parser`)."""

    output: str | None = dataclasses.field(
        default=None, metadata={"help": "folder for comparison.md and loss_curves.png (default: print only)"}
    )
    overwrite: bool = dataclasses.field(
        default=False, metadata={"help": "replace comparison.md / loss_curves.png in --output"}
    )


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        dataclass_types=[CompareOptions],
        formatter_class=argparse.HelpFormatter,
        help="overlay the loss curves and tabulate the final metrics of fine-tuning runs",
        description=(
            "Compare transformers Trainer / TRL runs (their output_dir, or one of its checkpoint-* folders): final and "
            "best evaluation loss, perplexity, train/validation gap, time per step, tokens per second and total / "
            "active parameters, as a Markdown table; with --output also comparison.md and loss_curves.png there."
        ),
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a Trainer run")
    parser.set_defaults(handler=run_compare, spelling=parser_spelling(parser))
    return parser


def run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .compare import COMPARISON_PLOT, COMPARISON_TABLE, compare_runs

    (options,) = dataclasses_from(args, [CompareOptions])
    for run_dir in args.run_dirs:
        if not Path(run_dir).is_dir():
            raise FileNotFoundError(f"RUN_DIR {run_dir}: no such folder")
    if options.output is not None and not options.overwrite:
        for name in (COMPARISON_TABLE, COMPARISON_PLOT):
            if (Path(options.output) / name).exists():
                raise FileExistsError(f"--output {options.output} already holds {name}; pass --overwrite to replace it")
    print(compare_runs(args.run_dirs, options.output, overwrite=options.overwrite), end="")
    if options.output is not None:
        print(f"Wrote {Path(options.output) / COMPARISON_TABLE} and {Path(options.output) / COMPARISON_PLOT}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-moe", description="hf_moe: sparse Mixture-of-Experts for Hugging Face transformers"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OptionsParser)
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
        print(f"{parser.prog}: error: {in_terms(error, args.spelling)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; nothing was written to the output directory", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
