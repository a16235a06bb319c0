"""`fedkeeper insights`: questions about a session answered by the
fl_insights function (docs/insights.md), deployed like the other functions
on the insights cluster (scenario.insights.cluster, else the server's).

The keeper sends a signed query and gets a small answer back: the figures
themselves, or the id of a GridFS blob holding a larger answer, which it
reads from the store. Queries are not recorded as invocation attempts of
the session: they are no part of its training, and recording them would
change the very records `reliability` reports on.
"""
from __future__ import annotations

from .client import FUNCTION, WHATS, InsightsClient, InsightsError
from .render import TableSpec, last_round, parse_rounds, provenance, shown_rounds, tables

__all__ = ["FUNCTION", "WHATS", "InsightsClient", "InsightsError", "last_round", "parse_rounds", "provenance",
           "shown_rounds", "TableSpec", "tables"]
