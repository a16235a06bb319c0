"""Knative's default prices (docs/cost.md). A self-hosted cluster has no
list price: it is priced like Google's managed Knative offering, Cloud Run
functions (the neutral `providers.prices`), so that sweeps across platforms
compare; a cluster's `pricing` overrides."""
from __future__ import annotations

from dataclasses import replace

from ..prices import CLOUD_RUN_FUNCTIONS_TIER1

DEFAULT_PRICES = replace(CLOUD_RUN_FUNCTIONS_TIER1, source=f"priced as {CLOUD_RUN_FUNCTIONS_TIER1.source}")
