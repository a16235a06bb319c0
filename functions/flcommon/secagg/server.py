"""The aggregator's side of secure aggregation: the sum of the round's
masked vectors, unmasked with the shares the survivors revealed, decoded
into FedAvg's weighted mean delta and handed to the session's (streaming)
strategy. No single client's update is ever decoded here: the server only
reads masked vectors, and the one thing it unmasks is their sum."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .. import store, update_data
from ..blobs import BlobError
from ..entry import BadRequest
from ..strategies import Strategy, StrategyError
from . import protocol, relay, session as sa_session
from .field import FieldError
from .keys import CryptoError
from .shamir import ShareError
from .updates import decode_mean


def _masked_vector(db, doc: dict[str, Any], sess: str, rnd: int, length: int) -> np.ndarray:
    meta = (db[f"{store.BUCKET}.files"].find_one({"_id": doc.get("blob_id")}, {"metadata": 1}) or {}).get("metadata")
    if not meta or meta.get("kind") != "masked" or meta.get("session") != sess or meta.get("round") != rnd \
            or meta.get("client") != doc["client"]:
        raise BadRequest(f"{doc['client']}'s update in round {rnd + 1} is not its masked vector")
    arrays = store.get_arrays(db, doc["blob_id"], max_bytes=8 * length + 4096)
    if len(arrays) != 1 or arrays[0].dtype != np.uint64 or arrays[0].shape != (length,):
        raise BadRequest(f"{doc['client']}'s masked vector is not {length} field elements")
    return arrays[0]


def secure_aggregate(db, sess: str, rnd: int, wanted: Sequence[tuple[str, int]], global_weights: list[np.ndarray],
                     strategy: Strategy, spec: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """What fl_server_aggregator's aggregate() returns, (contributions,
    rejections), for a securely aggregated round; the strategy has been fed
    so that its finish() yields the weighted mean of the survivors' deltas
    and shares() each survivor's share n_i / sum n."""
    sa = sa_session.settings(spec)
    if not strategy.streaming:
        raise BadRequest(f"secure aggregation needs a FedAvg-family strategy; {strategy.name} needs every "
                         "update on its own")
    sets = relay.sets(db, sess, rnd)
    if not {"u1", "u2", "u3"} <= set(sets):
        raise BadRequest(f"round {rnd + 1}: the secure-aggregation stages have not fixed u1, u2 and u3")
    u1, u2, u3 = sets["u1"], sets["u2"], sets["u3"]
    rejected = [{"client": c, "round": r, "reason": "secure aggregation sums only the round's masked set",
                 "mark": False} for c, r in wanted if r != rnd or c not in u3]
    reference = [(w.shape, w.dtype) for w in global_weights]
    length = sum(int(np.prod(s)) for s, _ in reference)
    docs = {d["client"]: d for d in db[store.UPDATES].find({"session": sess, "round": rnd, "client": {"$in": u3}},
                                                          update_data.WITHOUT_DATA) if store.keyed(d)}
    sizes = {d["client"]: d.get("num_examples") for d in db[store.PARTITIONS].find(
        {"session": sess, "client": {"$in": u3}}, {"client": 1, "num_examples": 1})}
    masked, examples, clipped = {}, {}, {}
    for c in u3:
        doc = docs.get(c)
        if doc is None or not doc.get("masked"):
            raise BadRequest(f"round {rnd + 1}: {c} is in the masked set but has no masked update stored")
        n = doc.get("num_examples")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (sizes.get(c) is not None and n != sizes[c]):
            raise BadRequest(f"round {rnd + 1}: {c}'s update claims {n!r} examples, its partition has {sizes.get(c)}")
        try:
            masked[c] = _masked_vector(db, doc, sess, rnd, length)
        except BlobError as exc:
            raise BadRequest(f"round {rnd + 1}: {c}'s masked vector is unreadable: {exc}") from None
        examples[c] = n
        k = doc.get("quantization_clipped", 0)
        clipped[c] = k if isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= length else 0
    responders = relay.done(db, sess, rnd, "reveal", u3)
    try:
        total = protocol.unmasked_sum(sa_session.context(sess, rnd), relay.public_keys(db, sess, rnd, u1), u2,
                                      masked, relay.revealed(db, sess, rnd, responders),
                                      sa_session.threshold(sa, len(u1)), sa_session.neighbours(sa, sess, rnd, u1))
        del masked
        n_total = sum(examples.values())
        mean = decode_mean(total, n_total, reference, sa["scale"])
    except (protocol.ProtocolError, ShareError, CryptoError, FieldError) as exc:
        raise BadRequest(f"round {rnd + 1}: secure aggregation cannot unmask the sum: {exc}") from None
    # The sum arrives whole. The first survivor carries it (scaled so that
    # weight x delta is the sum), the others add zeros with their weights:
    # the strategy then holds exactly sum_i n_i delta_i over sum_i n_i, and
    # each survivor's share is n_i / sum n, as in plain FedAvg.
    strategy.begin(reference)
    first = u3[0]
    accepted = []
    try:
        for c in u3:
            n = examples[c]
            delta = [m * np.float32(n_total / n) for m in mean] if c == first else \
                [np.zeros(s, np.float32) for s, _ in reference]
            strategy.add(delta, n, mass=n)
            accepted.append({"client": c, "round": rnd, "staleness": 0, "num_examples": n, "raw_weight": n,
                             "quantization_clipped": clipped[c]})
    except StrategyError as exc:
        raise BadRequest(f"round {rnd + 1}: {exc}") from None
    return accepted, rejected
