"""The `faults:` block of a local cluster in the config, validated by the
local platforms' one fault model (faults.FaultPlan)."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, model_validator

from .faults import FaultPlan


class FaultConfig(BaseModel):
    """Fault injection on local clusters (probabilities per invocation)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    crash: float = 0.0
    timeout: float = 0.0            # held until the function's time limit, as on the platform
    timeout_instant: float = 0.0    # recorded as a timeout at once (tests, benches)
    throttle: float = 0.0
    slow_ms: int = 0
    seed: int = 0
    functions: Optional[list[str]] = None  # None: every function

    @model_validator(mode="after")
    def _valid(self):
        FaultPlan.parse(self.model_dump())
        return self

    def plan(self) -> FaultPlan:
        return FaultPlan.parse(self.model_dump())

    def applies_to(self, function: str) -> bool:
        return self.functions is None or function in self.functions
