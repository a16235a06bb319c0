"""The computations behind `fedkeeper insights` (docs/insights.md), free of
any I/O: the fl_insights function reads the store and its cache, and hands
plain numbers and flat vectors to these.

Vectors are an update's delta flattened into one float32 array: the
client's weights minus the global model it trained from. The aggregated
update of round R is model R+1 minus model R.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .contributions import aggregation_of

# Iglewicz and Hoaglin's modified z-score: 0.6745 * (x - median) / MAD; a
# value beyond 3.5 is an outlier. 0.6745 makes the MAD consistent with the
# standard deviation of a normal sample.
MAD_SCALE = 0.6745
# When more than half the values are equal the MAD is 0; the mean absolute
# deviation, scaled by sqrt(pi/2) ~ 1.2533, stands in for it.
MEAN_AD_SCALE = 1.253314
OUTLIER_Z = 3.5
# The spread a z-score divides by is at least this share of the median:
# clients trained alike send updates whose norms agree to a few percent,
# and a MAD that small would make a 2% difference look like an outlier.
MIN_RELATIVE_SPREAD = 0.05
MIN_VALUES_FOR_Z = 3     # with fewer values every point is as far as the median is
MAX_GROUPS = 8


def finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def robust_z(values: Sequence[float | None],
             min_relative_spread: float = MIN_RELATIVE_SPREAD) -> list[float | None]:
    """Modified z-score of each value over the finite ones (None for the
    others, and for all when fewer than MIN_VALUES_FOR_Z are finite). The
    spread is at least `min_relative_spread` times the median."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size < MIN_VALUES_FOR_Z:
        return [None] * len(values)
    med = float(np.median(finite))
    mad = float(np.median(np.abs(finite - med)))
    if mad > 0:
        scale = mad / MAD_SCALE
    else:
        mean_ad = float(np.mean(np.abs(finite - med)))
        scale = MEAN_AD_SCALE * mean_ad
    scale = max(scale, min_relative_spread * abs(med))
    out: list[float | None] = []
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(None)
        elif scale > 0:
            out.append((v - med) / scale)
        else:  # all finite values are equal
            out.append(0.0)
    return out


def norm(vector: np.ndarray) -> float:
    return math.sqrt(float(np.dot(vector, vector)))


def cosine(a: np.ndarray, b: np.ndarray, norm_a: float, norm_b: float) -> float | None:
    """Cosine similarity; None when either vector is zero."""
    if norm_a == 0.0 or norm_b == 0.0:
        return None
    return max(-1.0, min(1.0, float(np.dot(a, b)) / (norm_a * norm_b)))


def score_round(rows: list[dict[str, Any]], vectors: list[np.ndarray | None],
                aggregate: np.ndarray | None) -> list[dict[str, Any]]:
    """Add norm, cosine, z and flags to the rows of one aggregation round.

    rows[i] carries at least `status` and may carry `nan` (the update holds
    NaN or inf) and `error` (it could not be read); vectors[i] is its delta
    (None when there is none to use). The robust z-score is taken over the
    round's finite norms, rejected updates included: a rejection for a
    reason other than its values says nothing about its size."""
    agg_norm = norm(aggregate) if aggregate is not None else None
    norms = [norm(v) if v is not None else None for v in vectors]
    zs = robust_z(norms)
    out = []
    for row, v, n, z in zip(rows, vectors, norms, zs):
        row = dict(row)
        cos = cosine(v, aggregate, n, agg_norm) if v is not None and aggregate is not None else None
        flags = []
        if row.pop("nan", False):
            flags.append("nan")
        if row.get("error"):
            flags.append("unreadable")
        if row.get("status") == "rejected":
            flags.append("rejected")
        if z is not None and abs(z) > OUTLIER_Z:
            flags.append("norm_outlier")
        if cos is not None and cos < 0:
            flags.append("negative_cosine")
        row.update(norm=n, cosine=cos, z=z, flags=flags)
        out.append(row)
    return out


def shares(rows: list[dict[str, Any]], accepted: list[bool], recorded: list[float | None]) -> list[float | None]:
    """Each update's share of the aggregate: the weight the aggregator
    recorded, else (sessions aggregated before weights were recorded) its
    num_examples over those of the round's accepted updates."""
    if any(w is not None for a, w in zip(accepted, recorded) if a):
        return [w if a else None for a, w in zip(accepted, recorded)]
    total = sum(int(r.get("num_examples") or 0) for r, a in zip(rows, accepted) if a)
    return [(int(r.get("num_examples") or 0) / total) if a and total else None
            for r, a in zip(rows, accepted)]


# --------------------------------------------------------------------------- rounds

def client_order(client: str) -> tuple[int, str]:
    tail = str(client).rsplit("_", 1)[-1]
    return (int(tail), client) if tail.isdigit() else (1 << 30, client)


def aggregation_round(u: dict[str, Any], counted: dict[tuple[str, int], int]) -> int:
    """The aggregation an update belongs to: the one that counted it (from
    the models' contributions, flcommon.contributions), else its own round's."""
    agg = aggregation_of(u, counted)
    return int(u["round"]) if agg is None else agg


def round_rows(rnd: int, updates: list[dict[str, Any]], next_model: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The aggregator's verdict on each update of one aggregation round:
    from the model document's contributions when recorded, else from
    accepted_clients / the update's own status."""
    contributions = next_model.get("contributions") if next_model else None
    counted: dict[tuple[str, int], dict[str, Any]] = {}
    if isinstance(contributions, list):
        counted = {(c["client"], c.get("round", rnd)): c for c in contributions if isinstance(c, dict)}
    rejected = {}
    for r in (next_model or {}).get("rejected") or []:
        if isinstance(r, dict) and "client" in r:
            rejected[(r["client"], r.get("round", rnd))] = r.get("reason")
    accepted_clients = (next_model or {}).get("accepted_clients")
    rows, accepted, recorded = [], [], []
    for u in updates:
        key = (u["client"], u["round"])
        if contributions is not None:
            ok = key in counted
        elif next_model is not None:
            ok = u.get("status") != "rejected" and key not in rejected and (
                accepted_clients is None or u["client"] in accepted_clients)
        else:
            ok = False
        weight = u.get("weight") if u.get("weight") is not None else counted.get(key, {}).get("weight")
        status = "accepted" if ok else ("rejected" if key in rejected and u.get("status") != "stale"
                                        else u.get("status") or "received")
        metrics = u.get("metrics") if isinstance(u.get("metrics"), dict) else {}
        rows.append({"round": rnd, "client": u["client"], "trained_from": u["round"],
                     "staleness": rnd - u["round"], "status": status, "num_examples": u.get("num_examples"),
                     "loss": finite_or_none(metrics.get("loss")),
                     "reason": u.get("reason") or (rejected.get(key) if not ok else None)})
        accepted.append(ok)
        recorded.append(finite_or_none(weight))
    for row, share in zip(rows, shares(rows, accepted, recorded)):
        row["share"] = share
    return rows


# --------------------------------------------------------------------------- clusters

def cosine_distances(matrix: np.ndarray) -> np.ndarray:
    """Pairwise cosine distance (1 - cosine similarity) of the rows, in
    float64; a zero row is at distance 1 from every other row."""
    gram = (matrix @ matrix.T).astype(np.float64)
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    safe = np.where(norms > 0, norms, 1.0)
    sim = gram / np.outer(safe, safe)
    sim[norms == 0, :] = 0.0
    sim[:, norms == 0] = 0.0
    dist = np.clip(1.0 - sim, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    return (dist + dist.T) / 2  # exactly symmetric, as the clustering expects


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel groups by first appearance, so the same partition always
    gets the same numbers."""
    order: dict[int, int] = {}
    for lab in labels:
        order.setdefault(int(lab), len(order))
    return np.array([order[int(lab)] for lab in labels], dtype=int)


def cluster_vectors(clients: list[str], matrix: np.ndarray, k: int | None = None,
                    max_groups: int = MAX_GROUPS) -> dict[str, Any]:
    """Group clients by the cosine distance of their vectors (one row each):
    agglomerative clustering, average linkage. Without `k`, the number of
    groups is the one in 2..min(max_groups, n-1) with the best silhouette
    score (the smallest on a tie). Fewer than 3 clients make one group."""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import silhouette_score

    n = len(clients)
    if n != matrix.shape[0]:
        raise ValueError("one vector per client is needed")
    if n == 0:
        return {"k": 0, "k_chosen_by": "no clients", "silhouette": None, "silhouette_by_k": {},
                "groups": [], "labels": {}}
    if k is not None and not 1 <= k <= max(1, n):
        raise ValueError(f"k={k} groups cannot be made from {n} clients")
    dist = cosine_distances(matrix) if n else np.zeros((0, 0))

    def fit(groups: int) -> np.ndarray:
        if groups == 1 or n < 2:
            return np.zeros(n, dtype=int)
        if groups == n:
            return np.arange(n)
        model = AgglomerativeClustering(n_clusters=groups, metric="precomputed", linkage="average")
        return _canonical(model.fit_predict(dist))

    def silhouette(labels: np.ndarray) -> float | None:
        groups = len(set(labels.tolist()))
        if not 2 <= groups <= n - 1:
            return None
        return float(silhouette_score(dist, labels, metric="precomputed"))

    scores: dict[int, float | None] = {}
    if k is not None:
        chosen = k
        labels = fit(k)
        scores[k] = silhouette(labels)
    elif n < 3:
        chosen, labels = 1, fit(1)
    else:
        best: tuple[float, int, np.ndarray] | None = None
        for groups in range(2, min(max_groups, n - 1) + 1):
            labels_g = fit(groups)
            s = silhouette(labels_g)
            scores[groups] = s
            if s is not None and (best is None or s > best[0]):
                best = (s, groups, labels_g)
        chosen, labels = (best[1], best[2]) if best else (1, fit(1))
    groups_out = []
    for g in range(chosen):
        idx = np.flatnonzero(labels == g)
        within = dist[np.ix_(idx, idx)]
        pairs = len(idx) * (len(idx) - 1)
        mean_cos = float(1.0 - within.sum() / pairs) if pairs else None
        groups_out.append({"group": g, "size": int(len(idx)), "clients": [clients[i] for i in idx],
                           "mean_cosine": mean_cos})
    return {"k": chosen, "k_chosen_by": "given" if k is not None else ("silhouette" if n >= 3 else "too few clients"),
            "silhouette": scores.get(chosen), "silhouette_by_k": {str(g): s for g, s in scores.items()},
            "groups": groups_out, "labels": {c: int(lab) for c, lab in zip(clients, labels)}}
