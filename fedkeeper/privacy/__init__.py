"""The keeper's side of privacy: the DP accountant (epsilon per round, the
budget check) and the orchestration of secure aggregation's stages. The
mechanisms themselves (clipping, noise, masking) run inside the functions:
flcommon.privacy and flcommon.secagg."""
from __future__ import annotations

from .accountant import ACCOUNTANTS, AccountingError, PrivacyBudget, describe_epsilon, dp_event, epsilon

__all__ = ["ACCOUNTANTS", "AccountingError", "PrivacyBudget", "describe_epsilon", "dp_event", "epsilon"]
