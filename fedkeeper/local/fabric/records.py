"""Activation records: built once as the JSON OpenWhisk answers (full
document and list summary), kept in memory per namespace within a budget of
BYTES (and of count), oldest dropped first, and listed newest first."""
from __future__ import annotations

import bisect
import json
from typing import TYPE_CHECKING, Any

from .status import STATUS, SUCCESS

if TYPE_CHECKING:
    from .entities import Activation, Settings

# What one kept record costs beyond its two JSON texts (index entries, tuple,
# dict slot, id string), so that many tiny records are bounded too.
RECORD_OVERHEAD_BYTES = 400


def build(act: "Activation", code: int, result_json: str, start_ms: int, end_ms: int, wait_ms: int,
          init_ms: int | None, timed_out: bool) -> tuple[bytes, bytes]:
    """(full record, list summary) of a finished activation, as OpenWhisk's
    API returns them."""
    a = act.action
    annotations = [
        {"key": "path", "value": f"{a.namespace}/{a.name}"},
        {"key": "waitTime", "value": wait_ms},
        {"key": "kind", "value": a.exec.get("kind")},
        {"key": "timeout", "value": timed_out},
        {"key": "limits", "value": {"concurrency": a.limits["concurrency"], "logs": a.limits["logs"],
                                    "memory": a.limits["memory"], "timeout": a.limits["timeout"]}},
    ]
    if init_ms is not None:
        annotations.append({"key": "initTime", "value": init_ms})
        # how the cold start was served, in the terms of OpenWhisk's
        # invoker (containerState): on a prewarmed stem cell, or a new process
        annotations.append({"key": "fk-start", "value": "prewarmed" if act.prewarmed else "cold"})
    if act.fault:
        annotations.append({"key": "fk-fault", "value": act.fault})
    ns = act.ns.name
    head = (f'{{"namespace":{json.dumps(ns)},"name":{json.dumps(a.name)},'
            f'"version":"{a.semver}","subject":{json.dumps(ns)},'
            f'"activationId":"{act.id}","start":{start_ms},"end":{end_ms},'
            f'"duration":{end_ms - start_ms},')
    ann = json.dumps(annotations, separators=(",", ":"))
    doc = (head + f'"response":{{"status":"{STATUS[code]}","statusCode":{code},'
           f'"success":{"true" if code == SUCCESS else "false"},"result":{result_json},'
           f'"size":{len(result_json)}}},"logs":[],"annotations":{ann},"publish":false}}').encode()
    summary = (head + f'"statusCode":{code},"annotations":{ann},"publish":false}}').encode()
    return doc, summary


def user_status_code(result: Any) -> int | None:
    """The status code an action put in its result (error.statusCode, else
    statusCode), as OpenWhisk reads it for openwhisk_action_status_code:
    numbers are truncated to integers, anything else counts as 400."""
    if not isinstance(result, dict):
        return None
    err = result.get("error")
    if isinstance(err, dict) and "statusCode" in err:
        v = err["statusCode"]
    elif "statusCode" in result:
        v = result["statusCode"]
    else:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        return 400
    return int(v)


def _insort(lst: list, entry: tuple) -> None:
    # Activations finish roughly in start order: appending is the common case.
    if not lst or lst[-1] <= entry:
        lst.append(entry)
    else:
        bisect.insort(lst, entry)


class ActivationRecords:
    """The finished activations of one namespace. Not locked itself: the
    fabric calls it under its lock."""

    def __init__(self, settings: "Settings"):
        self.settings = settings
        # id -> (start_ms, name, doc bytes, summary bytes)
        self.by_id: dict[str, tuple[int, str, bytes, bytes]] = {}
        # Sorted by (start_ms, seq): the whole namespace and per action name.
        self.index: list[tuple[int, int, str]] = []
        self.by_name: dict[str, list[tuple[int, int, str]]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.by_id)

    @staticmethod
    def _cost(doc: bytes, summary: bytes) -> int:
        return len(doc) + len(summary) + RECORD_OVERHEAD_BYTES

    def add(self, aid: str, start_ms: int, seq: int, name: str, doc: bytes, summary: bytes) -> None:
        entry = (start_ms, seq, aid)
        self.by_id[aid] = (start_ms, name, doc, summary)
        self.bytes += self._cost(doc, summary)
        _insort(self.index, entry)
        _insort(self.by_name.setdefault(name, []), entry)
        if self.bytes > self.settings.record_bytes or len(self.by_id) > self.settings.max_records:
            self._trim()

    def _trim(self) -> None:
        """Drop the oldest records down to 90% of both budgets (amortised:
        the per-name indexes are rebuilt once per trim)."""
        byte_goal = int(self.settings.record_bytes * 0.9)
        count_goal = int(self.settings.max_records * 0.9)
        drop = 0
        names = set()
        while drop < len(self.index) and (self.bytes > byte_goal or len(self.by_id) > count_goal):
            aid = self.index[drop][2]
            rec = self.by_id.pop(aid, None)
            if rec is not None:
                self.bytes -= self._cost(rec[2], rec[3])
                names.add(rec[1])
            drop += 1
        del self.index[:drop]
        for n in names:
            kept = [e for e in self.by_name.get(n, ()) if e[2] in self.by_id]
            if kept:
                self.by_name[n] = kept
            else:
                self.by_name.pop(n, None)

    def get(self, aid: str) -> tuple[int, str, bytes, bytes] | None:
        return self.by_id.get(aid)

    def _range(self, name: str | None, since: int | None, upto: int | None) -> tuple[list, int, int]:
        idx = self.by_name.get(name, []) if name else self.index
        lo = bisect.bisect_left(idx, (since, -1, "")) if since is not None else 0
        hi = bisect.bisect_right(idx, (upto, float("inf"), "")) if upto is not None else len(idx)
        return idx, lo, hi

    def list(self, name: str | None, since: int | None, upto: int | None, limit: int, skip: int,
             docs: bool) -> list[bytes]:
        idx, lo, hi = self._range(name, since, upto)
        # Newest first, as OpenWhisk lists.
        stop = max(lo, hi - skip)
        sel = idx[max(lo, stop - limit):stop]
        part = 2 if docs else 3
        return [self.by_id[e[2]][part] for e in reversed(sel)]

    def count(self, name: str | None, since: int | None, upto: int | None) -> int:
        _, lo, hi = self._range(name, since, upto)
        return max(0, hi - lo)
