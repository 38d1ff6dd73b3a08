"""``python -m hf_moe.upcycle SOURCE OUTPUT_DIR ...``: the same as ``hf-moe upcycle``."""

import argparse
import sys

from .cli import configure_upcycle_parser, main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_moe.upcycle",
        description=(
            "Convert a dense transformers checkpoint into an hf_moe Mixture-of-Experts checkpoint "
            "(the same as `hf-moe upcycle`)."
        ),
    )
    configure_upcycle_parser(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(parser=build_parser()))
