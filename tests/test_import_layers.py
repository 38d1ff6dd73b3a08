"""The package's import graph: layers import downwards only, with no loops (imports inside functions count)."""

import ast
from pathlib import Path

import pytest

import hf_moe

PACKAGE = Path(hf_moe.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(module: str) -> set[str]:
    """The hf_moe modules ``module`` imports anywhere in its code (an import of a package is one of its __init__)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            anchor = package
            for _ in range(node.level - 1):
                anchor = anchor.rpartition(".")[0]
            stem = (f"{anchor}.{node.module}" if node.module else anchor) if node.level else node.module or ""
            names = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in MODULES else stem for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _in(module: str, *prefixes: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _in(m, "hf_moe.checkpoints")))
def test_checkpoint_files_layer_knows_no_conversion(module):
    outside = {m for m in _imports(module) if not _in(m, "hf_moe.checkpoints")}
    assert outside <= {"hf_moe.transformers_internals", "hf_moe.options"}, f"{module} imports {sorted(outside)}"


def test_cards_import_nothing_from_the_conversions():
    assert {m for m in _imports("hf_moe.cards") if not _in(m, "hf_moe.modeling")} == set()


def test_no_import_loops():
    graph = {module: _imports(module) for module in MODULES}
    loops, state = [], {}

    def visit(module: str, path: list[str]) -> None:  # depth-first; a grey node met again closes a loop
        state[module] = "grey"
        for target in sorted(graph[module]):
            if state.get(target) == "grey":
                loops.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "black"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert loops == [], "\n".join(" -> ".join(loop) for loop in loops)
