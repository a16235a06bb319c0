"""`config show`: the resolved config, written so that reading it back gives
the same values. Durations and memory carry their unit (`300s`, `2048MB`);
a secret is written as the `${ENV}` reference or `<key>_file` it came from,
or as `***` (which loading refuses) when it was written inline."""
from __future__ import annotations

from typing import Any

import yaml
from pydantic import SecretStr

from ..user_module import module_path
from .model import SECRET_KEYS, Config, redact
from .units import format_duration_s, format_memory_mb
from .values import ENV_RE, PASSWORD_PLACEHOLDER, only_references, url_credential


def _secret_in(key: str, value: Any) -> bool:
    if isinstance(value, SecretStr):
        return value.get_secret_value() not in ("", "embedded")
    if key in SECRET_KEYS and isinstance(value, str):
        return bool(value)
    if isinstance(value, str):
        credential = url_credential(value)
        return bool(credential) and credential != PASSWORD_PLACEHOLDER
    return False


def _with_units(path: tuple, key: str, value: Any) -> Any:
    # scenarios.<s>.functions.<fn>.<section>.<key>
    if len(path) == 5 and path[0] == "scenarios" and path[2] == "functions":
        if key == "memory" and isinstance(value, (int, float)):
            return format_memory_mb(value)
        if key == "timeout" and isinstance(value, (int, float)):
            return format_duration_s(value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _written_is_safe(key: str, written: tuple[str, str]) -> bool:
    """True when the value as written holds no secret itself: a <key>_file
    path, or nothing but ${VAR} references where the secret goes."""
    written_key, text = written
    if written_key != key:
        return True
    if "://" in text and key not in SECRET_KEYS:
        credential = url_credential(text)
        return not credential or credential == PASSWORD_PLACEHOLDER or only_references(credential)
    return only_references(text)


def to_yaml_dict(cfg: Config) -> dict[str, Any]:
    """The config as `config show` prints it (see the module docstring)."""
    sources = cfg._sources

    def walk(o: Any, path: tuple) -> Any:
        if isinstance(o, dict):
            out: dict[str, Any] = {}
            for k, v in o.items():
                p = path + (k,)
                written = sources.get(p)
                if written and written[0] != k:  # from a <key>_file: name the file again
                    out[written[0]] = written[1]
                    continue
                if k in SECRET_KEYS and written and written[0] == k and _plain(v) in ("", None) \
                        and ENV_RE.fullmatch(written[1].strip()):
                    # `${VAR:-}` with VAR unset: still the reference, so that
                    # the output takes VAR once it is set, as the config does
                    out[k] = written[1]
                    continue
                if _secret_in(k, v):
                    if written and _written_is_safe(k, written):
                        out[written[0]] = written[1]
                    else:
                        out[k] = redact({k: _plain(v)})[k]
                    continue
                out[k] = _with_units(path, k, walk(v, p))
            return out
        if isinstance(o, list):   # a list's URLs are masked like a key's
            return [redact(v) if _secret_in("", v) else walk(v, path + (i,)) for i, v in enumerate(o)]
        return _plain(o)

    data = cfg.model_dump(mode="python", by_alias=True, exclude_none=True)
    # Sections without clusters add nothing.
    data["providers"] = {s: c for s, c in data.get("providers", {}).items() if c}
    # A user module's path is relative to the config file: written absolute,
    # it names the same module wherever the output is saved.
    for name, scen in cfg.scenarios.items():
        where = module_path(cfg, scen)
        if where is not None:
            data["scenarios"][name]["user_module"]["path"] = str(where)
    return walk(data, ())


def render_config(cfg: Config) -> str:
    return yaml.safe_dump(to_yaml_dict(cfg), sort_keys=False, allow_unicode=True)
