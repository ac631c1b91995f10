"""YAML read safely: no objects, no duplicate keys, no alias bombs, bounded size.

One loader for every YAML file dsml reads (the cluster config, job files).  A
``SafeLoader`` already refuses arbitrary objects, but it accepts a "billion laughs"
document: ten lines whose aliases expand to 10**9 nodes.  PyYAML builds such a document
quickly (aliases share one node), and whoever walks the result (``json.dumps`` of a job)
then runs for minutes and fills memory.  :func:`load` measures the document as it would
be expanded, from the composed node graph with each shared node counted once per use,
and refuses it before anything walks it.  A recursive alias (``&a [*a]``) is refused too.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Final

import yaml

__all__ = ["MAX_NODES", "YAMLLimitError", "load"]

#: Most nodes a document may expand to (every scalar, list and mapping counted once per use).
MAX_NODES: Final = 5_000_000


class YAMLLimitError(yaml.YAMLError):
    """The document is larger than allowed once expanded, or refers to itself."""


class StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys and documents that expand too far.

    Plain YAML keeps the last of two ``w1:`` entries and silently drops the first; in a
    cluster file that is a worker or a setting quietly lost.
    """

    max_nodes: int = MAX_NODES

    def compose_document(self) -> Any:
        """Compose as SafeLoader does, then measure the expanded size before construction."""
        try:
            node = super().compose_document()
        except RecursionError:
            raise YAMLLimitError("the document is nested too deeply") from None
        if node is not None:
            _check_expansion(node, self.max_nodes)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        """Construct a mapping as SafeLoader does, after checking its keys are distinct."""
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class reports an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node, limit: int) -> None:
    """Raise YAMLLimitError if ``root`` expands to more than ``limit`` nodes or is cyclic.

    Iterative (a deep document cannot exhaust the stack) and linear in the composed
    graph: each node's expanded size is computed once and reused wherever it is aliased.
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        nid = id(node)
        if children_done:
            on_path.discard(nid)
            total = 1 + sum(size[id(c)] for c in _children(node))
            if total > limit:
                raise YAMLLimitError(
                    f"the document expands to more than {limit:,} nodes (an alias bomb?)"
                )
            size[nid] = total
            continue
        if nid in size:
            continue
        on_path.add(nid)
        stack.append((node, True))
        for child in _children(node):
            cid = id(child)
            if cid in on_path:
                raise YAMLLimitError("an alias refers to a node that contains it")
            if cid not in size:
                stack.append((child, False))


def load(text: str, *, max_nodes: int = MAX_NODES) -> Any:
    """The one document in ``text``, safely (see the module docstring).

    Raises ``yaml.YAMLError`` (a ``MarkedYAMLError`` where it can say where), including
    :class:`YAMLLimitError` for a document that expands past ``max_nodes``.
    """
    loader = StrictLoader(text)
    loader.max_nodes = max_nodes
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
