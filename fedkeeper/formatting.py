"""Numbers as the terminal tables and progress lines print them."""
from __future__ import annotations

from typing import Any


def fixed_decimals(value: Any, digits: int = 4) -> str:
    """A float with `digits` decimals (so a column of them lines up), any
    other value as it prints (counts stay whole), "-" for a missing one."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
