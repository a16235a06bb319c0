"""The client's side of secure aggregation inside functions: the key
stages (advertise, share, unmask) and the masked upload that replaces a
plain update when the session aggregates securely."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .. import store
from ..entry import BadRequest
from . import protocol, relay, session as sa_session
from .field import FieldError
from .keys import CryptoError
from .updates import encode_update

STAGES = ("advertise", "share", "unmask")


def _need(db, sess: str, rnd: int, name: str, client: str) -> list[str]:
    members = relay.need_set(db, sess, rnd, name)
    if client not in members:
        raise BadRequest(f"{client} is not in round {rnd + 1}'s secure-aggregation set {name}")
    return members


def run_stage(db, bound: Mapping[str, str], spec: Mapping[str, Any], sess: str, rnd: int, client: str,
              stage: str) -> dict[str, Any]:
    """One key stage for one client; its output goes to the store once
    (a retry finds it there and writes nothing)."""
    sa = sa_session.settings(spec)
    if sa is None:
        raise BadRequest(f"session {sess} does not use secure aggregation")
    if stage not in STAGES:
        raise BadRequest(f"stage must be one of {list(STAGES)}, got {stage!r}")
    if client not in spec["clients"]:
        raise BadRequest(f"{client} is not a client of session {sess}")
    secret = sa_session.client_secret(bound)
    ctx = sa_session.context(sess, rnd)
    try:
        if stage == "advertise":
            written = relay.put(db, sess, rnd, client, "keys", protocol.advertise(secret, ctx, client))
            return {"stage": stage, "written": written}
        u1 = _need(db, sess, rnd, "u1", client)
        t = sa_session.threshold(sa, len(u1))
        roster = relay.public_keys(db, sess, rnd, u1)
        if stage == "share":
            out = protocol.share_keys(secret, ctx, client, roster, t, sa_session.neighbours(sa, sess, rnd, u1))
            written = relay.put(db, sess, rnd, client, "shares", {"to": out})
            return {"stage": stage, "written": written, "receivers": len(out)}
        u2 = relay.need_set(db, sess, rnd, "u2")
        u3 = _need(db, sess, rnd, "u3", client)
        inbox = relay.inbox(db, sess, rnd, client, u2)
        out = protocol.unmask(secret, ctx, client, roster, inbox, u2, u3, t, sa_session.neighbours(sa, sess, rnd, u1))
        written = relay.put(db, sess, rnd, client, "reveal", out)
        return {"stage": stage, "written": written, "revealed": len(out["b"]) + len(out["s"])}
    except (protocol.ProtocolError, CryptoError) as exc:
        raise BadRequest(f"secure aggregation, {stage} of {client} in round {rnd + 1}: {exc}") from None


def masked_update(db, bound: Mapping[str, str], spec: Mapping[str, Any], sess: str, rnd: int, client: str,
                  attempt: int, delta: Sequence[np.ndarray], num_examples: int) -> tuple[Any, int]:
    """Quantize num_examples x delta, mask it and store only the masked
    vector. Returns (blob id, values clipped to the field's bound)."""
    sa = sa_session.settings(spec)
    u1 = _need(db, sess, rnd, "u1", client)
    u2 = _need(db, sess, rnd, "u2", client)
    secret = sa_session.client_secret(bound)
    t = sa_session.threshold(sa, len(u1))
    try:
        vector, clipped = encode_update(delta, num_examples, max_clients=len(u1), scale=sa["scale"])
        masked = protocol.mask(secret, sa_session.context(sess, rnd), client, vector,
                               relay.public_keys(db, sess, rnd, u2), t, sa_session.neighbours(sa, sess, rnd, u1))
    except (protocol.ProtocolError, CryptoError, FieldError) as exc:
        raise BadRequest(f"secure aggregation, masking {client}'s update in round {rnd + 1}: {exc}") from None
    del vector
    blob = store.put_arrays(db, [masked], f"{sess}/masked/{rnd:03d}/{client}.npz",
                            {"kind": "masked", "session": sess, "round": rnd, "client": client,
                             "attempt": attempt})
    return blob, clipped
