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


def line_index(text: str) -> dict[tuple, int]:
    """Key path -> 1-based line, from PyYAML's node tree."""
    return _compose(text)[0]


def duplicate_keys(text: str) -> list[tuple[tuple, int, int]]:
    """(key path, first line, repeated line) of each key given twice in one
    mapping: YAML loaders keep the last silently."""
    return _compose(text)[1]


def _compose(text: str) -> tuple[dict[tuple, int], list[tuple[tuple, int, int]]]:
    index: dict[tuple, int] = {}
    duplicates: list[tuple[tuple, int, int]] = []
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index, duplicates

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
