"""The shape of the house, read from the code: no import circle inside ``dsml/``, the
nodes never import the user-facing client, no room grows past a size without saying why.

Imports are read with ``ast`` (nothing is imported), every ``import`` statement counts
wherever it stands (a function-level import is still a dependency), except those under
``if TYPE_CHECKING:``, which never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

DSML = Path(__file__).resolve().parent.parent / "dsml"

#: A module longer than this must say in its docstring why it is one room.
ROOM_LINES = 650
#: The words that docstring must hold.
ONE_ROOM = "one room"

#: Modules the cluster's nodes must never import: the user's blocking client and the CLI.
USER_FACING = ("dsml.client", "dsml.cli")
NODES = ("dsml.master", "dsml.worker")


def module_name(path: Path) -> str:
    rel = path.relative_to(DSML.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(DSML.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The dsml modules that module ``name`` imports."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = name.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = []
            for alias in node.names:
                sub = f"{prefix}.{alias.name}"
                # `from pkg import submodule` depends on the submodule, not on pkg's body.
                targets.append(sub if sub in known else prefix)
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target.startswith("dsml") and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_reader_finds_a_planted_cycle() -> None:
    """The cycle finder itself: a small graph with one circle and one chain."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_reader_sees_real_edges() -> None:
    graph = import_graph()
    assert "dsml.protocol.codec" in graph["dsml.client.server"]
    assert "dsml.config" in graph["dsml.tap"]  # an absolute import
    assert "dsml.protocol.limits" in graph["dsml.protocol.methods"]  # `from . import limits`


def test_no_import_cycle_inside_dsml() -> None:
    assert cycles(import_graph()) == []


def test_nodes_never_import_the_user_facing_client() -> None:
    graph = import_graph()
    bad = sorted(
        (name, target)
        for name, targets in graph.items()
        if name.startswith(NODES)
        for target in targets
        if target.startswith(USER_FACING)
    )
    assert bad == []


def test_long_modules_say_why_they_are_one_room() -> None:
    long = []
    for name, path in modules().items():
        text = path.read_text()
        lines = text.count("\n")
        if lines <= ROOM_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if ONE_ROOM not in doc.lower():
            long.append((name, lines))
    assert long == []


def test_every_module_says_what_it_owns() -> None:
    """Each module, package faces included, opens with a docstring."""
    bare = [
        name for name, path in modules().items()
        if not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert bare == []
