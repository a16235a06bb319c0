"""The keeper's fake store (tests/keeper_fakes.py), which the keeper's unit
tests drive on an injected clock, answers as the real one (SecantusDB
behind fedkeeper.store) does: the same calls on both, the same answers.
Covers what the keeper's ownership, resume and heartbeat logic rests on."""
from __future__ import annotations

from keeper_fakes import FakeStore

ME = {"host": "h", "boot": 1.0, "pid": 10, "started": 5.0}
OTHER = {"host": "h", "boot": 1.0, "pid": 11, "started": 6.0}


def sequence(store) -> list:
    """Ownership calls and what the store answers or holds after each."""
    out = []

    def state():
        doc = store.session("s") or {}
        return {k: doc.get(k) for k in ("state", "keeper", "heartbeat", "x")}

    store.create_session({"_id": "s", "name": "n", "state": "running"})
    out.append(("heartbeat, nobody's session", store.heartbeat("s", now=1.0, keeper=ME)))
    out.append(("claim", store.claim_session("s", None, ME, state="running"), state()))
    out.append(("claim again, answer lost", store.claim_session("s", None, ME), state()))
    out.append(("another's claim", store.claim_session("s", None, OTHER), state()))
    out.append(("heartbeat, mine", store.heartbeat("s", now=2.0, keeper=ME), state()))
    out.append(("heartbeat, another's", store.heartbeat("s", now=3.0, keeper=OTHER), state()))
    out.append(("take over a gone keeper", store.claim_session("s", ME, OTHER), state()))
    out.append(("end, no longer mine", store.end_session("s", ME, state="finished"), state()))
    store.update_session("no-such-session", x=1)
    out.append(("update of a missing session", store.session("no-such-session")))
    out.append(("interrupted by its keeper", store.mark_interrupted("s", keeper=OTHER), state()["state"]))
    out.append(("end, mine", store.end_session("s", OTHER, state="finished"), state()))
    return out


def test_the_fake_store_answers_ownership_calls_as_the_real_one(store):
    assert sequence(FakeStore()) == sequence(store)
