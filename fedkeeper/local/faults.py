"""The fault model of the local platforms: one validation and one seeded
draw, used by the fabric and by the local Cloud Functions host alike.

Kinds (probabilities per invocation, adding up to at most 1):
  crash            the function's process dies under the invocation
  timeout          the invocation is held until the function's time limit and
                   then ends as the platform ends a time-limit overrun: what a
                   real timeout costs
  timeout_instant  recorded as a time-limit overrun at once, without the wait
                   (for tests and benches that want the outcome, not the cost)
  throttle         the platform refuses the invocation (429)
and `slow_ms` added to every matching invocation.

The fault of the n-th invocation in a scope (for example namespace/action)
is a pure function of (seed, scope, n): a seed gives the same faults for the
same sequence of invocations however they interleave in time.

Standard library only: the Cloud Functions host loads this file by path in
the function's own process, which must not import the keeper.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping

KINDS = ("crash", "timeout", "timeout_instant", "throttle")
FIELDS = KINDS + ("slow_ms", "seed", "functions")


def _is_number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass(frozen=True)
class FaultPlan:
    crash: float = 0.0
    timeout: float = 0.0
    timeout_instant: float = 0.0
    throttle: float = 0.0
    slow_ms: int = 0
    seed: int = 0
    functions: tuple[str, ...] | None = None   # None: every function

    @classmethod
    def parse(cls, body: Any) -> "FaultPlan":
        """Validate a fault setting (a JSON object or config mapping); raises
        ValueError naming what is wrong."""
        if not isinstance(body, Mapping):
            raise ValueError("faults must be an object")
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown fault keys {unknown} (known: {list(FIELDS)})")
        values = {k: v for k, v in body.items() if v is not None}
        for k in KINDS:
            v = values.get(k, 0.0)
            if not _is_number(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{k} must be a probability between 0 and 1")
            values[k] = float(v)
        if sum(values[k] for k in KINDS) > 1.0 + 1e-12:
            raise ValueError(f"{' + '.join(KINDS)} probabilities add up to more than 1")
        slow = values.get("slow_ms", 0)
        if not _is_number(slow) or int(slow) != slow or not 0 <= slow <= 3_600_000:
            raise ValueError("slow_ms must be a whole number of milliseconds between 0 and 3600000")
        values["slow_ms"] = int(slow)
        seed = values.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError("seed must be an integer")
        fns = values.get("functions")
        if fns is not None:
            if not isinstance(fns, (list, tuple)) or not all(isinstance(x, str) for x in fns):
                raise ValueError("functions must be a list of function names, or null for all")
            values["functions"] = tuple(fns)
        return cls(**values)

    def to_json(self) -> dict:
        return {"crash": self.crash, "timeout": self.timeout, "timeout_instant": self.timeout_instant,
                "throttle": self.throttle, "slow_ms": self.slow_ms, "seed": self.seed,
                "functions": list(self.functions) if self.functions is not None else None}

    def applies_to(self, name: str) -> bool:
        return self.functions is None or name in self.functions

    @property
    def draws_faults(self) -> bool:
        return any(getattr(self, k) for k in KINDS)

    def draw(self, scope: str, name: str, n: int) -> str | None:
        """The fault of the n-th invocation of `name` in `scope`, or None."""
        if not self.applies_to(name) or not self.draws_faults:
            return None
        digest = hashlib.sha256(f"{self.seed}\0{scope}\0{name}\0{n}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
        edge = 0.0
        for kind in KINDS:
            edge += getattr(self, kind)
            if u < edge:
                return kind
        return None
