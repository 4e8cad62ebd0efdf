"""The package's imports flow one way (docs/design.md §2), with no cycle anywhere.

Every ``import`` in ``src/ultrafastbert`` is read with :mod:`ast`, including imports inside
functions (a cycle hidden behind a function-level import is still a cycle) but not those under
``if TYPE_CHECKING:`` (they never run). Each module gets a level from :data:`LEVELS`; a module may
import modules of its own level or below, never above. Packages that do not exist yet are simply
absent from the walk.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ultrafastbert

PACKAGE_ROOT = Path(ultrafastbert.__file__).resolve().parent
NAME = "ultrafastbert"

#: Module-name prefix -> level, longest prefix wins. Lower levels never import higher ones:
#: errors/utils -> tree maths -> reference -> kernels -> dispatcher -> layer -> model ->
#: data/train/infer/glue/convert -> serve/bench -> cli.
LEVELS: dict[str, int] = {
    "ultrafastbert.errors": 0,
    "ultrafastbert.utils": 0,
    "ultrafastbert.fff.tree": 1,
    "ultrafastbert.fff.reference": 2,
    "ultrafastbert.fff.kernel": 3,
    "ultrafastbert.fff.pytorch": 3,
    "ultrafastbert.fff.triton": 3,
    "ultrafastbert.fff.native": 3,
    "ultrafastbert.fff.gemm": 3,
    "ultrafastbert.fff.token_split": 4,
    "ultrafastbert.fff.dispatch": 4,
    "ultrafastbert.fff.layer": 5,
    "ultrafastbert.fff": 5,
    "ultrafastbert.model": 6,
    "ultrafastbert.data": 7,
    "ultrafastbert.train": 7,
    "ultrafastbert.infer": 7,
    "ultrafastbert.glue": 7,
    "ultrafastbert.convert": 7,
    "ultrafastbert.serve": 8,
    "ultrafastbert.bench": 8,
    "ultrafastbert.cli": 9,
    "ultrafastbert": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import that can run: all of them except the bodies of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (``from . import x`` resolves to module ``x`` when
    it is one, else to the package)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix
                       for a in node.names]
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target.startswith(NAME) and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def level(name: str) -> int:
    prefix = max((p for p in LEVELS if name == p or name.startswith(p + ".")), key=len)
    return LEVELS[prefix]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (level {level(a)}) imports {b} (level {level(b)})"
                  for a, targets in graph.items() for b in targets if level(b) > level(a))


def test_every_module_has_a_level() -> None:
    for name in all_modules():
        assert level(name) >= 0


def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_imports_follow_the_documented_direction() -> None:
    assert upward_imports(import_graph()) == []


def test_the_walk_sees_module_and_function_level_imports() -> None:
    graph = import_graph()
    assert "ultrafastbert.fff.dispatch" in graph["ultrafastbert.fff.layer"]  # `from . import`
    # dispatch.registry() imports the kernel modules inside the function
    assert {"ultrafastbert.fff.native.kernel", "ultrafastbert.fff.pytorch.kernel",
            "ultrafastbert.fff.triton.kernel"} <= graph["ultrafastbert.fff.dispatch"]
    assert graph["ultrafastbert.model.checkpoint"] <= {
        "ultrafastbert.model.config", "ultrafastbert.errors", "ultrafastbert.utils",
        "ultrafastbert.utils.io", "ultrafastbert.utils.jsonfile", "ultrafastbert.utils.oserrors"}


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set()}, None),
])
def test_cycle_finder(graph, expected) -> None:
    assert find_cycle(graph) == expected


def test_a_hidden_function_level_cycle_is_caught(tmp_path: Path) -> None:
    mod = tmp_path / "m.py"
    mod.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\n"
                   "def f():\n    from . import y\n")
    names = [n.names[0].name for n in _import_nodes(ast.parse(mod.read_text()))]
    assert names == ["TYPE_CHECKING", "y"]


def test_an_upward_import_is_caught() -> None:
    graph = {"ultrafastbert.fff.tree": {"ultrafastbert.model.config"}}
    assert upward_imports(graph) == [
        "ultrafastbert.fff.tree (level 1) imports ultrafastbert.model.config (level 6)"]
