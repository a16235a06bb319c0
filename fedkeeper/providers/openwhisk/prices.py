"""OpenWhisk's default prices (docs/cost.md).

IBM Cloud Functions, the public OpenWhisk service, charged memory time only:
no CPU or per-invocation charge. A self-hosted cluster has no list price;
pricing it like the public service keeps sweeps across platforms comparable
(a cluster's `pricing` changes it)."""
from __future__ import annotations

from ..base import Prices

IBM_CLOUD_FUNCTIONS = Prices(per_gb_second=0.000017, billing_increment_ms=100,
                             source="IBM Cloud Functions (OpenWhisk) price sheet")
