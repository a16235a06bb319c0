"""The stored global models of a session, as `fedkeeper model` shows them.

Numbering: a model's number is the store's `models.round`, which is also the
1-based round users see everywhere else. Round R of training (store round
R-1) aggregates into model R; model 0 is the initial model, before any
training. So `model export --round 3` is the model that came out of the
third round, the one whose accuracy `status` shows on its row 3.
"""
from __future__ import annotations

from typing import Any

from flcommon import store as fs


class ModelTrailError(ValueError):
    """A session or model is missing, or lacks what a command needs; the
    message says which and why."""


def session_doc(store, session: str) -> dict[str, Any]:
    doc = store.session(session)
    if doc is None:
        raise ModelTrailError(f"no session {session!r} in the store")
    return doc


def model_docs(store, session: str) -> list[dict[str, Any]]:
    """Every global model document of a session, by round."""
    return list(store.db[fs.MODELS].find({"session": session}).sort("round", 1))


def blob_sizes(store, blob_ids: list[Any]) -> dict[Any, int]:
    """Stored size in bytes of each blob that exists."""
    files = store.db[f"{fs.BUCKET}.files"].find({"_id": {"$in": blob_ids}}, {"length": 1})
    return {d["_id"]: int(d["length"]) for d in files}


def _trail_summary(doc: dict[str, Any]) -> dict[str, Any] | None:
    trail = doc.get("trail")
    if not isinstance(trail, dict):
        return None
    return {k: trail.get(k) for k in ("parent", "config_hash", "code_hash", "user_module", "clients", "updates")}


def model_rows(store, session: str) -> list[dict[str, Any]]:
    """One row per stored model: round, metrics, examples, strategy, size,
    validations and trail (None for models written before trails were)."""
    session_doc(store, session)
    docs = model_docs(store, session)
    sizes = blob_sizes(store, [d["blob_id"] for d in docs if d.get("blob_id") is not None])
    rows = []
    for d in docs:
        metrics = d.get("metrics") or {}
        validations = d.get("validations") or {}
        rows.append({
            "round": int(d["round"]),
            "accuracy": metrics.get("accuracy"),
            "loss": metrics.get("loss"),
            "examples": d.get("num_examples"),
            "clients": d.get("accepted"),
            "strategy": d.get("strategy") or ("initial" if d["round"] == 0 else None),
            "bytes": sizes.get(d.get("blob_id")),
            "num_params": d.get("num_params"),
            "stored": d.get("blob_id") in sizes,
            "created": d.get("created"),
            "validations": sorted(validations.values(), key=lambda v: v.get("created") or 0),
            "trail": _trail_summary(d),
        })
    return rows


def pick_model(rows: list[dict[str, Any]], session: str, *, round_: int | None = None, best: bool = False,
               final: bool = False) -> dict[str, Any]:
    """The row `--round R`, `--best` (highest test accuracy; the earliest of
    equals) or `--final` (the last model; the default) selects."""
    if sum((round_ is not None, best, final)) > 1:
        raise ModelTrailError("choose one of --round, --best and --final")
    if not rows:
        raise ModelTrailError(f"session {session} has no stored global model (it never initialised)")
    if round_ is not None:
        for r in rows:
            if r["round"] == round_:
                return r
        raise ModelTrailError(f"session {session} has no model {round_}: its models are rounds "
                              f"{rows[0]['round']}..{rows[-1]['round']} (0 is the initial model)")
    if best:
        scored = [r for r in rows if r["accuracy"] is not None]
        if not scored:
            raise ModelTrailError(f"session {session} has no evaluated model yet (no round finished)")
        return max(scored, key=lambda r: (r["accuracy"], -r["round"]))
    return rows[-1]


def model_doc(store, session: str, rnd: int) -> dict[str, Any]:
    doc = store.db[fs.MODELS].find_one({"session": session, "round": rnd})
    if doc is None:
        raise ModelTrailError(f"session {session} has no model {rnd}")
    return doc


def validation_rows(store, session: str) -> list[dict[str, Any]]:
    """Every stored validation of a session's models, by model round then
    time: model round, data, accuracy, loss, examples, when (for `report`)."""
    docs = store.db[fs.MODELS].find({"session": session, "validations": {"$exists": True}},
                                    {"round": 1, "validations": 1})
    rows = []
    for d in docs:
        for v in (d.get("validations") or {}).values():
            m = v.get("metrics") or {}
            rows.append({"model": int(d["round"]), "data": v.get("data"), "accuracy": m.get("accuracy"),
                         "loss": m.get("loss"), "examples": v.get("num_examples"), "created": v.get("created")})
    return sorted(rows, key=lambda r: (r["model"], r["created"] or 0))
