"""`fedkeeper cluster info --write-config`: the figures written into the
YAML file in place, without a YAML round-trip. PyYAML would drop every
comment and lose `${ENV}` layout, and ruamel.yaml is not a dependency. The
`configurations` mapping of the named cluster is located through PyYAML's
node marks, only the four value spans are rewritten (or the missing lines
inserted with the siblings' indentation), the result is re-parsed and
checked that nothing but those keys changed before the file is replaced
atomically.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import yaml

from .introspection import CONFIG_KEYS

# ------------------------------------------------------------------ write-config

class ConfigEditError(ValueError):
    """The config file cannot be edited safely (cluster not found, odd layout)."""


def _scalar_text(key: str, value: Any, old: yaml.Node | None) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    # keep the operator's quoting: FedKeeper's sample writes each_host_cores: "32"
    if isinstance(old, yaml.ScalarNode) and old.style in ('"', "'"):
        return json.dumps(text)
    return text


def _find_cluster(root: yaml.Node, cluster_name: str) -> yaml.MappingNode:
    if not isinstance(root, yaml.MappingNode):
        raise ConfigEditError("the config's top level is not a mapping")
    providers = next((v for k, v in root.value if k.value == "providers"), None)
    if not isinstance(providers, yaml.MappingNode):
        raise ConfigEditError("the config has no providers mapping")
    for _section_key, section in providers.value:
        if not isinstance(section, yaml.MappingNode):
            continue
        for k, v in section.value:
            if k.value == cluster_name:
                if not isinstance(v, yaml.MappingNode) or v.flow_style:
                    raise ConfigEditError(f"cluster {cluster_name} is not a block mapping")
                return v
    raise ConfigEditError(f"no cluster named {cluster_name!r} under providers")


def _append_lines(text: str, last: yaml.Node, lines: list[str]) -> tuple[int, int, str]:
    """An insertion of `lines` right after the node `last` (the last value
    of a block mapping). A scalar ends inside its line (a comment may
    follow): insert after that line's end. A block collection's end mark
    already sits at the start of the following line: insert there."""
    pos = last.end_mark.index
    if pos > 0 and text[pos - 1] == "\n":
        return pos, pos, "".join(line + "\n" for line in lines)
    eol = text.find("\n", pos)
    if eol < 0:
        return len(text), len(text), "".join("\n" + line for line in lines)
    return eol, eol, "".join("\n" + line for line in lines)


def edit_configurations(text: str, cluster_name: str, values: Mapping[str, Any]) -> str:
    """`text` with providers.<section>.<cluster_name>.configurations.<key>
    set to `values` (only CONFIG_KEYS); everything else byte for byte."""
    values = {k: v for k, v in values.items() if k in CONFIG_KEYS and v is not None}
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    cluster = _find_cluster(root, cluster_name)
    conf = next(((k, v) for k, v in cluster.value if k.value == "configurations"), None)
    edits: list[tuple[int, int, str]] = []   # (start, end, replacement), non-overlapping
    if conf is None:
        # a new block after the cluster's last key, indented like its keys
        indent = cluster.value[0][0].start_mark.column
        lines = [" " * indent + "configurations:"] + [
            f"{' ' * (indent + 2)}{k}: {_scalar_text(k, v, None)}" for k, v in values.items()]
        edits.append(_append_lines(text, cluster.value[-1][1], lines))
    else:
        key_node, node = conf
        if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null") and node.tag.endswith(":null"):
            indent = key_node.start_mark.column + 2
            line_end = text.find("\n", key_node.end_mark.index)
            line_end = len(text) if line_end < 0 else line_end
            block = "".join(f"\n{' ' * indent}{k}: {_scalar_text(k, v, None)}"
                            for k, v in values.items())
            edits.append((line_end, line_end, block))
        elif not isinstance(node, yaml.MappingNode):
            raise ConfigEditError(f"{cluster_name}.configurations is not a mapping")
        elif node.flow_style:
            parts, seen = [], set()
            for kn, vn in node.value:
                seen.add(kn.value)
                if kn.value in values:
                    parts.append(f"{kn.value}: {_scalar_text(kn.value, values[kn.value], vn)}")
                else:  # the pair as written
                    parts.append(text[kn.start_mark.index:vn.end_mark.index])
            for k, v in values.items():
                if k not in seen:
                    parts.append(f"{k}: {_scalar_text(k, v, None)}")
            edits.append((node.start_mark.index, node.end_mark.index, "{" + ", ".join(parts) + "}"))
        else:
            present = {k.value: (k, v) for k, v in node.value}
            indent = node.value[0][0].start_mark.column if node.value else key_node.start_mark.column + 2
            for k, v in values.items():
                if k in present:
                    _kn, vn = present[k]
                    if not isinstance(vn, yaml.ScalarNode):
                        raise ConfigEditError(f"{cluster_name}.configurations.{k} is not a scalar")
                    edits.append((vn.start_mark.index, vn.end_mark.index, _scalar_text(k, v, vn)))
            missing = [k for k in values if k not in present]
            if missing:
                lines = [f"{' ' * indent}{k}: {_scalar_text(k, values[k], None)}" for k in missing]
                edits.append(_append_lines(text, node.value[-1][1], lines))
    out = text
    for start, end, repl in sorted(edits, key=lambda e: e[0], reverse=True):
        out = out[:start] + repl + out[end:]
    _verify_edit(text, out, cluster_name, values)
    return out


def _verify_edit(before: str, after: str, cluster_name: str, values: Mapping[str, Any]) -> None:
    """The edit changed those keys and nothing else (else refuse to write)."""
    try:
        old, new = yaml.safe_load(before), yaml.safe_load(after)
    except yaml.YAMLError as exc:
        raise ConfigEditError(f"editing would break the YAML ({exc}); file left unchanged") from None
    def norm(doc: Any, apply: Mapping[str, Any] | None) -> Any:
        # quoting is kept from the file, so "8" and 8 both count as 8
        for section in (doc.get("providers") or {}).values():
            if isinstance(section, dict) and isinstance(section.get(cluster_name), dict):
                c = section[cluster_name]
                conf = dict(c.get("configurations") or {})
                conf.update(apply or {})
                c["configurations"] = {k: (str(v) if k in CONFIG_KEYS and not isinstance(v, bool)
                                           else v) for k, v in conf.items()}
        return doc

    if not isinstance(old, dict) or norm(old, values) != norm(new, None):
        raise ConfigEditError("the edit would change more than the configurations block; "
                              "file left unchanged")


def write_configurations(config_path: str | os.PathLike, cluster_name: str,
                         info: Mapping[str, Any]) -> dict[str, Any]:
    """Write `info["configurations"]` (from `cluster_info`) into the named
    cluster's configurations block of the YAML file; returns what was
    written. Comments, order and `${ENV}` references elsewhere stay as they
    were; the file is replaced atomically with its permissions kept."""
    path = Path(config_path)
    text = path.read_text()
    values = dict(info.get("configurations", info))
    values = {k: values[k] for k in CONFIG_KEYS if values.get(k) is not None}
    new = edit_configurations(text, cluster_name, values)
    if new != text:
        mode = path.stat().st_mode & 0o7777
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(new)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return values


