"""How a recipe script ends: user errors as one clean line, tracebacks only when asked for.

A recipe's ``main`` raises ``ValueError`` / ``TypeError`` / ``OSError`` (``FileNotFoundError``,
``FileExistsError``) for bad options, data and paths, with messages that name the option. Printed as
a Python traceback they hide that message under library frames; `run_recipe_main` prints
``<recipe>: error: <message>`` on stderr and returns exit status 2, like the ``hf-moe`` command line.
``--debug`` (taken off the command line before the recipe's parser sees it) or ``HF_MOE_DEBUG=1``
lets the exception through with its traceback. Other exceptions (bugs, out of memory) always keep it.
"""

import os
import sys

DEBUG_FLAG = "--debug"
DEBUG_ENVIRONMENT = "HF_MOE_DEBUG"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
USER_ERRORS = (ValueError, TypeError, OSError)


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENVIRONMENT, "").lower() in ("1", "true", "yes")


def run_recipe_main(main, argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` (``sys.argv[1:]`` by default) and return the exit status for ``sys.exit``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    program = os.path.basename(sys.argv[0]) or "recipe"
    try:
        main(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{program}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{program}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
