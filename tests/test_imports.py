"""The package's imports flow one way: no module imports, directly or through others, a module
that imports it back — module-level and function-level imports alike (a deferred import inside a
function still ties the two modules together); imports under `if TYPE_CHECKING:` never run and
are not counted. Walked from the source with `ast`, so a circle
that only some code path would load is found too."""
from __future__ import annotations

import ast
from pathlib import Path

import fgembed

ROOT = Path(fgembed.__file__).parent
CLI = ROOT.parent / "cli"


def _modules() -> dict[str, Path]:
    found = {}
    for base, package in ((ROOT, "fgembed"), (CLI, "fgembed.cli")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}  # for annotations only: never run
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        # `from . import x` names a submodule; `from .m import f` names m. A package's own
        # __init__ is not counted: it is the lazy public API, importing nothing at load time.
        out |= {t for t in targets if t in modules and t != name and modules[t].name != "__init__.py"}
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def test_the_package_has_no_import_circles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" → ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(modules) > 50 and any(graph.values())  # the walk found the package and its imports
    assert not circles, "\n".join(circles)
