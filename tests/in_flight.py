"""Client attempts the keeper has marked running, wherever the mark is:
on the attempt's document, or in a batch of running marks not yet folded
into it (fedkeeper/keeper/running_marks.py). What the resume and interrupt
tests wait for before they stop a keeper."""
from __future__ import annotations

from typing import Any

from fedkeeper.store import RUNNING_MARKS
from flcommon import store as fs


def marked_running(db, rnd: int | None = None, session: str | None = None) -> list[dict[str, Any]]:
    """fl_client attempts (of round `rnd`, of `session`, when given) marked
    running, as their documents stand: a batched one still says `submitting`."""
    scope = {"session": session} if session else {}
    batched = [m["attempt"] for b in db[RUNNING_MARKS].find(scope) for m in b.get("marks", [])]
    return list(db[fs.INVOCATIONS].find({
        **scope, **({"round": rnd} if rnd is not None else {}), "function": "fl_client",
        "$or": [{"state": "running"}, {"state": "submitting", "_id": {"$in": batched}}]}))


def first_marked_running(db, rnd: int | None = None) -> dict[str, Any] | None:
    return next(iter(marked_running(db, rnd)), None)
