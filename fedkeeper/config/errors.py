"""ConfigError, and the hint that a misspelt value gets."""
from __future__ import annotations

import difflib
from typing import Iterable, Optional

import yaml


class ConfigError(Exception):
    """A config problem, phrased for the operator: file, line, key, expectation."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 path: str | None = None):
        self.file, self.line, self.path, self.message = file, line, path, message
        where = file or "<config>"
        if line is not None:
            where += f":{line}"
        if path:
            where += f": {path}"
        super().__init__(f"{where}: {message}")


def closest(value: object, choices: Iterable[str], cutoff: float = 0.6) -> Optional[str]:
    """The choice a typo most likely meant, or None when none is close: the
    same letters in another order or case, or a string similarity of at
    least `cutoff`."""
    if not isinstance(value, str):
        return None
    choices = [str(c) for c in choices]
    lowered = {c.lower(): c for c in choices}
    v = value.strip().lower()
    if v in lowered and value not in choices:
        return lowered[v]
    for c in lowered:
        if sorted(c) == sorted(v) and c != v:
            return lowered[c]
    found = difflib.get_close_matches(v, list(lowered), n=1, cutoff=cutoff)
    return lowered[found[0]] if found else None


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """'; did you mean X?' when a choice is close to `value`, else ''."""
    hit = closest(value, choices)
    return f"; did you mean {hit}?" if hit else ""


def one_of(value: object, choices: Iterable[str], what: str = "value") -> str:
    """The refusal of a value outside a fixed set, with its hint."""
    choices = list(choices)
    return (f"unknown {what} {value!r}; expected one of {', '.join(choices)}"
            f"{did_you_mean(value, choices)}")


# Bounds of a config's YAML, far above any real config (a few hundred values,
# nested a dozen levels) and far below what exhausts the stack or the time:
# aliases repeat whole subtrees, so 341 bytes of nested anchors expand to
# half a million values. Counted with aliases expanded, as validation sees them.
MAX_DEPTH = 100
MAX_NODES = 100_000


class YamlBoundError(ValueError):
    """A YAML document beyond MAX_DEPTH or MAX_NODES, or one that contains itself."""

    def __init__(self, message: str, line: Optional[int]):
        super().__init__(message)
        self.line = line


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than MAX_DEPTH while composing
    (PyYAML composes recursively, so a deep enough document would exhaust the
    stack) and says where a value no constructor can convert is."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlBoundError(f"nested deeper than {MAX_DEPTH} levels", event.start_mark.line + 1)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if event.anchor and not isinstance(event, yaml.AliasEvent):
            node.anchor = event.anchor  # nodes do not keep it; check_expansion names it
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # e.g. an int of 5000 digits, month 13
            reason = str(exc).split(";")[0]  # not Python's advice on how to raise its limit
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value: {reason}",
                                                    node.start_mark) from None


def compose(text: str) -> Optional[yaml.Node]:
    """The node tree of `text` (None when empty), checked against the bounds
    above; raises yaml.YAMLError or YamlBoundError."""
    loader = BoundedLoader(text)
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    if root is not None:
        check_expansion(root)
    return root


def construct(root: yaml.Node) -> object:
    """The Python data of a node tree from compose()."""
    loader = BoundedLoader("")
    try:
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph that contains itself (`x: &a [*a]`), or that,
    with its aliases expanded, has more than MAX_NODES nodes or is deeper
    than MAX_DEPTH. Iterative and memoised on shared nodes: linear in the
    text however much the aliases expand."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()  # entered, not finished: the current node's ancestors
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        kids = _children(node)
        if finished:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            line = node.start_mark.line + 1
            if size[key] > MAX_NODES:
                raise YamlBoundError(f"holds more than {MAX_NODES:,} values once its aliases (*name) are "
                                     "expanded; a config needs far fewer", line)
            if depth[key] > MAX_DEPTH:
                raise YamlBoundError(f"nested deeper than {MAX_DEPTH} levels once its aliases (*name) "
                                     "are expanded", line)
            continue
        if key in size:
            continue
        open_nodes.add(key)
        stack.append((node, True))
        for k in kids:
            if id(k) in open_nodes:
                anchor = f" &{k.anchor}" if getattr(k, "anchor", None) else ""
                raise YamlBoundError(f"the anchor{anchor} at line {k.start_mark.line + 1} contains an "
                                     "alias of itself, which would never end", node.start_mark.line + 1)
            if id(k) not in size:
                stack.append((k, False))


def node_index(root: Optional[yaml.Node]) -> tuple[dict[tuple, int], list[tuple[tuple, int, int]]]:
    """Key path -> 1-based line, and (key path, first line, repeated line) of
    each key given twice in one mapping (YAML loaders keep the last silently),
    of a tree from compose(), whose bounds keep this walk short; walked before
    construct() merges `<<` keys into it."""
    index: dict[tuple, int] = {}
    duplicates: list[tuple[tuple, int, int]] = []

    def walk(node, path: tuple):
        index.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                p = path + (str(k.value),)
                line = k.start_mark.line + 1
                if str(k.value) in seen:
                    duplicates.append((p, seen[str(k.value)], line))
                seen.setdefault(str(k.value), line)
                index[p] = line
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    if root is not None:
        walk(root, ())
    return index, duplicates


def line_for(index: dict[tuple, int], path: tuple) -> Optional[int]:
    p = tuple(str(x) if not isinstance(x, int) else x for x in path)
    while p:
        if p in index:
            return index[p]
        p = p[:-1]
    return None


def dotted(path: tuple) -> str:
    return ".".join(str(x) for x in path)
