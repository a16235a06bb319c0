"""Published list prices shared by more than one platform (docs/cost.md).

Each platform's default prices are in its own package (`<platform>/prices.py`);
a sheet two platforms use lives here, neutral, so that a platform priced like
another one (Knative like Cloud Run functions) does not import that
platform's client library."""
from __future__ import annotations

from .base import Prices

#: Cloud Run functions (1st gen) list prices, Tier 1 regions, without the
#: monthly free tier: memory and CPU time in 100 ms steps plus a charge per
#: invocation; the CPU clock comes with the memory size.
CLOUD_RUN_FUNCTIONS_TIER1 = Prices(
    per_gb_second=0.0000025, per_ghz_second=0.0000100, per_million_invocations=0.40,
    billing_increment_ms=100,
    cpu_tiers=((128, 0.2), (256, 0.4), (512, 0.8), (1024, 1.4), (2048, 2.4), (4096, 4.8), (8192, 4.8)),
    source="Google Cloud Run functions (1st gen) price sheet, Tier 1")
