"""Messages that name options the way the caller spells them.

One option has one name (the dataclass field, ``num_experts_per_tok``) and three spellings: the
Python argument (``num_experts_per_tok=3``), the command-line flag (``--num-experts-per-tok 3``) and
the recipe's YAML key (``num_experts_per_tok: 3``). A message is written once as a template whose
placeholders are option names:

    {noise_std}          the option's name             noise_std / --noise-std
    {noise_std=}         the option and its value      noise_std=0.3 / --noise-std 0.3   (from ``values``)
    {expert_init=drop}   the option and a given value  expert_init='drop' / --expert-init drop
                         (a Python literal, else text: {norm_topk_prob=False}, {num_experts_per_tok=2})

and the caller renders it with its spelling (`python_spelling`, `parser_spelling`, `key_spelling`).
``str()`` of an error or warning made here is its Python spelling. This module imports nothing of
the package: the file handling below the conversions raises through it too.
"""

import argparse
import ast
from collections.abc import Callable

UNSET = object()
# (name, value) -> text; value is UNSET for the bare name.
Spelling = Callable[[str, object], str]


def python_spelling(name: str, value=UNSET) -> str:
    return name if value is UNSET else f"{name}={value!r}"


def key_spelling(keys: dict[str, str]) -> Spelling:
    """A recipe's spelling: ``keys`` maps an option to its config key (``seed`` -> ``upcycle.seed``)."""

    def spell(name: str, value=UNSET) -> str:
        key = keys.get(name, name)
        return key if value is UNSET else f"{key}={value!r}"

    return spell


def parser_spelling(parser: argparse.ArgumentParser) -> Spelling:
    """The command line's spelling of ``parser``'s options: the ``--kebab-case`` flag, a boolean as the
    flag alone (``--verify``, ``--no-progress``), a positional argument as its metavar (``OUTPUT_DIR 'x'``)."""
    flags, positionals, negations = {}, {}, {}
    for action in parser._actions:
        if not action.option_strings:
            positionals[action.dest] = action.metavar or action.dest.upper()
        elif isinstance(action, argparse._StoreFalseAction):
            negations[action.dest] = action.option_strings[-1]
        else:
            flags.setdefault(action.dest, action.option_strings[-1])  # HfArgumentParser lists --kebab-case last

    def spell(name: str, value=UNSET) -> str:
        if name in positionals:
            return positionals[name] if value is UNSET else f"{positionals[name]} {str(value)!r}"
        flag = flags.get(name, negations.get(name, f"--{name.replace('_', '-')}"))
        if value is UNSET:
            return flag
        if isinstance(value, bool):
            if value:
                return flag
            return negations[name] if name in negations else f"{flag} false"
        if isinstance(value, (list, tuple)):
            return f"{flag} {','.join(str(v) for v in value)}"
        return f"{flag} {value}"

    return spell


def render(template: str, values: dict, spell: Spelling) -> str:
    class Names(dict):
        def __missing__(self, key: str) -> str:
            name, given, literal = key.partition("=")
            if not given:
                return spell(name)
            return spell(name, values[name] if not literal else _literal_value(literal))

    return template.format_map(Names())


def _literal_value(text: str):
    """``{norm_topk_prob=False}`` -> False, ``{num_experts_per_tok=2}`` -> 2, ``{expert_init=drop}`` -> 'drop'."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def literal(text) -> str:
    """``text`` inside a template, where braces are not placeholders (a repr of a dict, a path)."""
    return str(text).replace("{", "{{").replace("}", "}}")


class OptionsError(ValueError):
    """Bad option values, every problem at once; each problem is ``(template, values)`` as above."""

    def __init__(self, problems: list[tuple[str, dict]], heading: str | None = None):
        self.problems, self.heading = list(problems), heading
        super().__init__(self.render(python_spelling))

    def render(self, spell: Spelling) -> str:
        lines = [render(template, values, spell) for template, values in self.problems]
        if self.heading is None and len(lines) == 1:
            return lines[0]
        return f"{self.heading or 'Invalid options'}:\n  - " + "\n  - ".join(lines)

    def __str__(self) -> str:
        return self.render(python_spelling)


def option_error(kind: type[BaseException], template: str, **values) -> BaseException:
    """An exception (or warning) of ``kind`` whose message names options: ``str()`` spells them as Python
    arguments, `in_terms` as the caller does."""
    error = kind(render(template, values, python_spelling))
    error.option_message = (template, values)
    return error


def in_terms(error: BaseException, spell: Spelling) -> str:
    """The message of ``error`` (an exception or warning) in the words of ``spell``."""
    if isinstance(error, OptionsError):
        return error.render(spell)
    message = getattr(error, "option_message", None)
    return render(*message, spell) if message is not None else str(error)
