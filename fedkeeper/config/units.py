"""Numbers with units: memory sizes and durations, parsed and written back.

Written forms read back to the same value: `format_memory_mb` gives
`2048MB`, `format_duration_s` gives `300s`, `1500ms` or `0.0125s`."""
from __future__ import annotations

import math
import re
from typing import Any

_NUMBER = r"[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?"
_MEMORY_RE = re.compile(rf"\s*({_NUMBER})\s*(mb|m|mi|mib|gb|g|gi|gib)?\s*", re.I)
_DURATION_RE = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|min|h)?\s*", re.I)
_DURATION_DIVISOR = {"ms": 1000}
_DURATION_FACTOR = {"s": 1, "m": 60, "min": 60, "h": 3600}


def number(v: Any, what: str) -> float:
    """A finite number from a YAML number or a numeric string."""
    if isinstance(v, bool):
        raise ValueError(f"expected a number for {what}, got a boolean")
    n: float | None = None
    if isinstance(v, (int, float)):
        n = float(v)
    elif isinstance(v, str):
        try:
            n = float(v.strip())
        except ValueError:
            n = None
    if n is None or not math.isfinite(n):
        raise ValueError(f"expected a number for {what}, got {v!r}")
    return n


def count(v: Any, what: str) -> int:
    """A positive whole number (concurrency, hosts) from a number or a string."""
    n = number(v, what)
    if n != int(n) or n < 1:
        raise ValueError(f"{what} must be a whole number of at least 1, got {v!r}")
    return int(n)


def is_bare_number(v: Any) -> bool:
    """A number with no unit: 2048, 2048.0 or "2048"."""
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    return isinstance(v, str) and re.fullmatch(rf"\s*(?:{_NUMBER})\s*", v) is not None


def parse_memory_mb(v: Any) -> int:
    """'2048', 2048, '2048MB', '2Gi', '2GB', '512M' -> MB (G units are 1024 MB)."""
    if isinstance(v, str):
        m = _MEMORY_RE.fullmatch(v)
        if not m:
            raise ValueError(f"expected a memory size such as 2048 or 2048MB or 2Gi, got {v!r}")
        n, unit = float(m.group(1)), (m.group(2) or "mb").lower()
        mb = n * 1024 if unit.startswith("g") else n
    else:
        mb = number(v, "memory")
    if not math.isfinite(mb) or mb < 1:
        raise ValueError(f"memory must be at least 1MB, got {v!r}")
    return int(mb)


def parse_duration_s(v: Any, bare_unit: str = "s") -> float:
    """'300s', '5m', '300000ms' -> seconds; a bare number is in `bare_unit`."""
    if isinstance(v, str):
        m = _DURATION_RE.fullmatch(v)
        if not m:
            raise ValueError(f"expected a duration such as 300s or 300000ms, got {v!r}")
        n, unit = float(m.group(1)), (m.group(2) or bare_unit).lower()
    else:
        n, unit = number(v, "duration"), bare_unit
    if not math.isfinite(n) or n <= 0:
        raise ValueError(f"duration must be positive, got {v!r}")
    # Dividing (not multiplying by 0.001) gives back exactly what
    # format_duration_s wrote: 120 / 1000 == 0.12.
    if unit in _DURATION_DIVISOR:
        return n / _DURATION_DIVISOR[unit]
    return n * _DURATION_FACTOR[unit]


def format_memory_mb(mb: int | float) -> str:
    return f"{int(mb)}MB"


def format_duration_s(seconds: float) -> str:
    """A duration with its unit, read back to the same float by parse_duration_s."""
    s = float(seconds)
    if s == int(s):
        return f"{int(s)}s"
    ms = round(s * 1000)
    if ms / 1000 == s:
        return f"{ms}ms"
    return f"{s!r}s"
