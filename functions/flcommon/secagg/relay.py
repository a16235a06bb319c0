"""What secure aggregation's stages hand each other through the store.

Collection `secagg`, one document per (session, round, client, stage),
unique, so a retried or late stage can never replace what the first one
wrote (and since every stage is deterministic, it would write the same):

  stage "keys"    {c_pk, s_pk}: the client's two public keys (U1)
  stage "shares"  {to: {receiver: ciphertext}}: its encrypted key shares (U2)
  stage "reveal"  {b: {owner: share}, s: {owner: share}}: what it reveals (unmask)
  client "_server", stage "sets": {u1, u2, u3}, the sets the keeper fixed
                  for the round, which every later stage reads

Masked updates are GridFS blobs (metadata kind "masked") referenced by the
round's update documents, as plain updates are. Every byte string read back
is checked for its type and size before use.
"""
from __future__ import annotations

import threading
from typing import Any, Iterable

import pymongo

from ..entry import BadRequest
from .keys import KEY_BYTES, NONCE_BYTES
from .shamir import Y_BYTES

SECAGG = "secagg"
SERVER = "_server"
STAGES = ("keys", "shares", "reveal")
#: the output of each client stage (fl_secagg_client), which proves the stage done
STAGE_OUTPUT = {"advertise": "keys", "share": "shares", "unmask": "reveal"}
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * Y_BYTES + 16  # nonce, two shares, GCM tag
MAX_CLIENTS = 10_000

_indexed: set[tuple[int, str]] = set()
_lock = threading.Lock()


def ensure_index(db) -> None:
    key = (id(db.client), db.name)
    with _lock:
        if key in _indexed:
            return
    asc = pymongo.ASCENDING
    db[SECAGG].create_index([("session", asc), ("round", asc), ("client", asc), ("stage", asc)], unique=True)
    with _lock:
        _indexed.add(key)


def put(db, session: str, rnd: int, client: str, stage: str, data: dict[str, Any]) -> bool:
    """Write a stage's output once; False when it was there already."""
    ensure_index(db)
    try:
        db[SECAGG].insert_one({"session": session, "round": rnd, "client": client, "stage": stage, **data})
        return True
    except pymongo.errors.DuplicateKeyError:
        return False


def get(db, session: str, rnd: int, client: str, stage: str) -> dict[str, Any] | None:
    return db[SECAGG].find_one({"session": session, "round": rnd, "client": client, "stage": stage})


def done(db, session: str, rnd: int, stage: str, clients: Iterable[str] | None = None) -> list[str]:
    """Clients whose `stage` output is stored (sorted)."""
    query: dict[str, Any] = {"session": session, "round": rnd, "stage": stage}
    if clients is not None:
        query["client"] = {"$in": list(clients)}
    return sorted(d["client"] for d in db[SECAGG].find(query, {"client": 1}) if _client_of(d) not in (None, SERVER))


def set_sets(db, session: str, rnd: int, **sets: list[str]) -> None:
    """The keeper fixes u1, u2 and u3 in turn; a set once fixed never changes
    (a resumed keeper reads it back instead of choosing again)."""
    ensure_index(db)
    db[SECAGG].update_one({"session": session, "round": rnd, "client": SERVER, "stage": "sets"},
                          {"$setOnInsert": {"created": True}}, upsert=True)
    for name, members in sets.items():
        db[SECAGG].update_one({"session": session, "round": rnd, "client": SERVER, "stage": "sets",
                               name: {"$exists": False}}, {"$set": {name: sorted(members)}})


def sets(db, session: str, rnd: int) -> dict[str, list[str]]:
    doc = get(db, session, rnd, SERVER, "sets") or {}
    out = {}
    for name in ("u1", "u2", "u3"):
        members = doc.get(name)
        if members is not None:
            out[name] = _client_list(members, name)
    return out


def need_set(db, session: str, rnd: int, name: str) -> list[str]:
    members = sets(db, session, rnd).get(name)
    if members is None:
        raise BadRequest(f"round {rnd + 1} of session {session} has no secure-aggregation set {name} yet")
    return members


def _client_of(doc: dict[str, Any]) -> str | None:
    """The client a stage document is of; None for one whose `client` is not
    a single id (MongoDB's `$in` also finds `client: ["c1"]` for c1)."""
    client = doc.get("client")
    return client if isinstance(client, str) else None


def _client_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_CLIENTS or not all(isinstance(c, str) for c in value):
        raise BadRequest(f"secure-aggregation set {what} is not a list of client ids")
    return value


def _bytes(value: Any, size: int, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        raise BadRequest(f"{what} must be {size} bytes")
    return bytes(value)


def public_keys(db, session: str, rnd: int, clients: Iterable[str]) -> dict[str, dict[str, bytes]]:
    """client -> {c_pk, s_pk} for every listed client (all must be there)."""
    clients = list(clients)
    found = {d["client"]: d for d in db[SECAGG].find({"session": session, "round": rnd, "stage": "keys",
                                                       "client": {"$in": clients}}) if _client_of(d)}
    out = {}
    for c in clients:
        d = found.get(c)
        if d is None:
            raise BadRequest(f"no public keys of {c} for round {rnd + 1}")
        out[c] = {k: _bytes(d.get(k), KEY_BYTES, f"{c}'s {k}") for k in ("c_pk", "s_pk")}
    return out


def inbox(db, session: str, rnd: int, receiver: str, senders: Iterable[str]) -> dict[str, bytes]:
    """sender -> the ciphertext it addressed to `receiver`."""
    out = {}
    for d in db[SECAGG].find({"session": session, "round": rnd, "stage": "shares",
                              "client": {"$in": list(senders)}}, {"client": 1, f"to.{receiver}": 1}):
        if _client_of(d) is None:
            continue
        to = d.get("to")
        ct = to.get(receiver) if isinstance(to, dict) else None
        if ct is not None:
            out[d["client"]] = _bytes(ct, CIPHERTEXT_BYTES, f"{d['client']}'s share for {receiver}")
    return out


def revealed(db, session: str, rnd: int, responders: Iterable[str]) -> dict[str, dict[str, dict[str, bytes]]]:
    out = {}
    for d in db[SECAGG].find({"session": session, "round": rnd, "stage": "reveal",
                              "client": {"$in": list(responders)}}):
        if _client_of(d) is None:
            continue
        shares: dict[str, dict[str, bytes]] = {}
        for which in ("b", "s"):
            part = d.get(which) or {}
            if not isinstance(part, dict) or len(part) > MAX_CLIENTS:
                raise BadRequest(f"{d['client']}'s revealed shares are malformed")
            shares[which] = {owner: _bytes(y, Y_BYTES, f"{d['client']}'s share of {owner}")
                             for owner, y in part.items()}
        out[d["client"]] = shares
    return out
