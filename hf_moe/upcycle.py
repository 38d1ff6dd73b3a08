"""``python -m hf_moe.upcycle SOURCE OUTPUT_DIR ...``: the same as ``hf-moe upcycle``."""

import sys

from .cli import UPCYCLE_DESCRIPTION, UPCYCLE_OPTIONS, OptionsParser, configure_upcycle_parser, main


def build_parser() -> OptionsParser:
    parser = OptionsParser(UPCYCLE_OPTIONS, prog="python -m hf_moe.upcycle", description=UPCYCLE_DESCRIPTION)
    configure_upcycle_parser(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(parser=build_parser()))
