"""Validations of stored models: the `--data` choices, and the keeper's
client of the fl_model_validate function, invoked on the server's cluster
through its provider like every other function (deployed on first use,
content-hashed, so an unchanged deployment is skipped)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from flcommon.auth import signed

from ..providers import ErrorClass, ProviderError
from ..runtime import Placement, Runtime
from .catalog import ModelTrailError

FUNCTION = "fl_model_validate"
# Limits when the scenario's functions block names none for it: it runs
# TensorFlow and holds one model and one data set.
DEFAULT_MEMORY_MB = 2048
DEFAULT_TIMEOUT_S = 300.0
DATA_HELP = ("test (the session's test split, the default), train (all its clients' partitions), "
             "digits, npz:PATH_OR_URL, module (the user module's load_data test split) or module:train")


def parse_data(text: str | None) -> dict[str, Any]:
    """`--data` as fl_model_validate's `data` payload field."""
    text = (text or "test").strip()
    if text in ("test", "train"):
        return {"source": "stored", "split": text}
    if text == "digits":
        return {"source": "dataset", "dataset": "digits"}
    if text.startswith("npz:") and len(text) > 4:
        return {"source": "dataset", "dataset": "npz", "path": text[4:]}
    if text in ("module", "module:test", "module:train"):
        return {"source": "module", "split": "train" if text.endswith(":train") else "test"}
    raise ValueError(f"--data {text!r}: expected {DATA_HELP}")


class ValidationClient:
    """Runs fl_model_validate on the scenario's server cluster."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.cluster = rt.server_cluster()
        section = rt.cfg.providers.clusters()[self.cluster][0]
        spec = rt.function_spec(FUNCTION, section)
        if section not in rt.scenario.functions.get(FUNCTION, {}):
            spec = replace(spec, memory_mb=DEFAULT_MEMORY_MB, timeout_s=DEFAULT_TIMEOUT_S)
        self.placement = Placement(self.cluster, section, spec)
        self._deployed = False

    def deploy(self) -> None:
        self.rt.phase(f"deploying {FUNCTION} on {self.cluster} (skipped when unchanged)")
        (_, _, err), = self.rt.deploy([self.placement])
        if err is not None:
            raise ModelTrailError(f"deploying {FUNCTION} on {self.cluster} failed: {err}")
        self._deployed = True

    def validate(self, session: str, model_round: int, data: dict[str, Any]) -> dict[str, Any]:
        """The stored validation result, with `cluster` and `platform`."""
        if not self._deployed:
            self.deploy()
        body = signed(self.rt.secret, {"function": FUNCTION, "session": session, "round": int(model_round),
                                       "data": data})
        provider = self.rt.provider(self.cluster)
        timeout = self.placement.spec.timeout_s + self.rt.scenario.training.attempt_grace_s
        self.rt.phase(f"running {FUNCTION} on {self.cluster} (a cold start takes seconds)")
        for attempt in (1, 2):
            try:
                out = provider.call(FUNCTION, body, timeout_s=timeout, poll_s=0.05)
            except ProviderError as exc:
                if exc.error_class == ErrorClass.FUNCTION_MISSING and attempt == 1:
                    self.deploy()
                    continue
                raise ModelTrailError(f"{FUNCTION} on {self.cluster}: {exc}") from None
            result = out.result or {}
            if out.ok and "error" not in result:
                return dict(result, cluster=self.cluster, platform=provider.platform)
            if out.error_class == ErrorClass.FUNCTION_MISSING and attempt == 1:
                self.deploy()
                continue
            raise ModelTrailError(str(result.get("error") or out.error or f"{FUNCTION} failed"))
        raise ModelTrailError(f"{FUNCTION} is missing on {self.cluster} even after deploying it")
