"""Which aggregation counted which update.

The model document an aggregation writes (round R + 1 for the aggregation
of round R) lists in `contributions` every update it counted, each with
the round its client trained from. That list is the record, written once
for all of them, and the model's insert is the single moment an
aggregation's counting becomes true. An update listed by one model is
refused by every later aggregation. The aggregator also marks each update
it counted only when the keeper asks (`mark_counted`: semi_async and
async, which find the updates still waiting by their status); a mark is a
write per update.

Stores written by earlier versions also marked each counted update itself
(`status: accepted`, `aggregated_in`); those marks are still honoured."""
from __future__ import annotations

from typing import Any, Iterable

#: what a model document is read for, here
PROJECTION = {"round": 1, "contributions.client": 1, "contributions.round": 1}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def counted_in(models: Iterable[dict[str, Any]]) -> dict[tuple[str, int], int]:
    """(client, round trained from) -> the round of the aggregation that
    counted it, from model documents. A contribution recorded without its
    round (older sessions) is of the aggregation's own round."""
    out: dict[tuple[str, int], int] = {}
    for model in models:
        rnd = model.get("round")
        if not _is_int(rnd) or rnd < 1:
            continue   # model 0 is the initial one: it counted nothing
        for c in model.get("contributions") or []:
            if not isinstance(c, dict) or not isinstance(c.get("client"), str):
                continue
            trained_from = c.get("round", rnd - 1)
            if _is_int(trained_from):
                out.setdefault((c["client"], trained_from), rnd - 1)
    return out


def marked_in(update: dict[str, Any]) -> int | None:
    """The aggregation an earlier version marked on the update document
    itself as having counted it, if any."""
    agg = update.get("aggregated_in")
    if update.get("status") == "accepted" and _is_int(agg):
        return agg
    return None


def aggregation_of(update: dict[str, Any], counted: dict[tuple[str, int], int]) -> int | None:
    """The round of the aggregation that counted this update document,
    None while none has."""
    done = counted.get((update.get("client"), update.get("round")))
    return done if done is not None else marked_in(update)
