"""Cloud Functions' default prices (docs/cost.md): the Cloud Run functions
list prices, which live in the neutral `providers.prices` because Knative is
priced like them too and must not import the Google client to get them."""
from __future__ import annotations

from ..prices import CLOUD_RUN_FUNCTIONS_TIER1

DEFAULT_PRICES = CLOUD_RUN_FUNCTIONS_TIER1
