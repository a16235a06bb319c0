"""fl_model_validate: evaluate a stored global model on a data set and store
the result next to the model (`models.validations.<key>`).

Payload: {session, round: R (the model round: 0 is the initial model, R the
model round R produced), data: one of
  {"source": "stored", "split": "test" | "train"}   the session's own test split,
                                                    or all its clients' partitions
  {"source": "dataset", "dataset": "digits"}        a built-in data set's test split,
  {"source": "dataset", "dataset": "npz", "path": P, "sha256": S (optional)}
  {"source": "module", "split": "test" | "train"}   the user module's load_data()
}

The key is a digest of (round, data), so validating the same model on the
same data again replaces the result. Returns the stored result (metrics,
examples, per-class accuracy for up to MAX_CLASSES classes)."""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np

from flcommon import store
from flcommon.context import database, global_model, ids, num_classes, partition_arrays, session_spec
from flcommon.data_url import bound_credentials
from flcommon.urls import shown, split_userinfo
from flcommon.entry import BadRequest
from flcommon.models import evaluate
from flcommon.user_code import BuiltinCode, code_for

SOURCES = ("stored", "dataset", "module")
SPLITS = ("test", "train")
DATASETS = ("digits", "npz")
MAX_CLASSES = 100


def parse_data(payload: dict[str, Any]) -> dict[str, Any]:
    data = payload.get("data") or {"source": "stored", "split": "test"}
    if not isinstance(data, dict):
        raise BadRequest("data must be an object such as {\"source\": \"stored\", \"split\": \"test\"}")
    source = data.get("source")
    if source not in SOURCES:
        raise BadRequest(f"data.source must be one of {', '.join(SOURCES)}, not {source!r}")
    if source == "dataset":
        if data.get("dataset") not in DATASETS:
            raise BadRequest(f"data.dataset must be one of {', '.join(DATASETS)}")
        out = {"source": source, "dataset": data["dataset"]}
        if data["dataset"] == "npz":
            if not isinstance(data.get("path"), str) or not data["path"]:
                raise BadRequest("data.path must name the npz file (a path or an http(s) URL)")
            out["path"] = data["path"]
            if data.get("sha256") is not None:
                out["sha256"] = str(data["sha256"])
        return out
    split = data.get("split", "test")
    if split not in SPLITS:
        raise BadRequest(f"data.split must be one of {', '.join(SPLITS)}, not {split!r}")
    return {"source": source, "split": split}


def describe(data: dict[str, Any]) -> str:
    if data["source"] == "stored":
        return f"session {data['split']} split"
    if data["source"] == "module":
        return f"user module {data['split']} split"
    return data["dataset"] if data["dataset"] != "npz" else f"npz {shown(data['path'])}"


def recorded(data: dict[str, Any]) -> dict[str, Any]:
    """The request as the validation stores it: the data URL without its
    user info (credentials are used, never stored)."""
    return {**data, "path": split_userinfo(data["path"])[0]} if "path" in data else data


def _stored_train(db, session: str, clients: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for c in clients:
        x, y = partition_arrays(db, session, c)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def arrays_for(db, session: str, spec: dict[str, Any], data: dict[str, Any],
               credentials: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`credentials`: those bound for the session's data URL (data_url.py)."""
    if data["source"] == "stored":
        if data["split"] == "test":
            x, y = partition_arrays(db, session, "_test")
            return x, y
        return _stored_train(db, session, spec["clients"])
    if data["source"] == "module":
        code = code_for(spec)
        if isinstance(code, BuiltinCode):
            raise BadRequest(f"session {session} was not trained with a user module")
        x_tr, y_tr, x_te, y_te = code.load_data(credentials)
        return (x_te, y_te) if data["split"] == "test" else (x_tr, y_tr)
    x_tr, y_tr, x_te, y_te = BuiltinCode({"data": {k: v for k, v in data.items() if k != "source"}}
                                         ).load_data(credentials)
    return x_te, y_te


def _per_class(spec, weights, x, y, classes: int) -> list[float | None] | None:
    if classes > MAX_CLASSES:
        return None
    out = []
    for c in range(classes):
        mask = y == c
        out.append(evaluate(spec, weights, x[mask], y[mask], classes)["accuracy"] if mask.any() else None)
    return out


def handle(payload: dict[str, Any], bound: dict[str, str]) -> dict[str, Any]:
    session, rnd = ids(payload)
    data = parse_data(payload)
    db = database(bound)
    spec = session_spec(db, session)
    t0 = time.perf_counter()
    _, weights = global_model(db, session, rnd)
    classes = num_classes(db, session)
    x, y = arrays_for(db, session, spec, data, bound_credentials(bound))
    want = partition_arrays(db, session, "_test")[0].shape[1:]
    if x.shape[1:] != want:
        raise BadRequest(f"{describe(data)}: samples have shape {x.shape[1:]}, the model takes {want}")
    if len(y) == 0 or int(y.min()) < 0 or int(y.max()) >= classes:
        raise BadRequest(f"{describe(data)}: labels must be class indices 0..{classes - 1} "
                         f"(found {int(y.min())}..{int(y.max())})" if len(y) else f"{describe(data)} is empty")
    metrics = evaluate(spec, weights, x, y, classes)
    request = recorded(data)
    key = hashlib.sha256(json.dumps({"round": rnd, "data": request}, sort_keys=True).encode()).hexdigest()[:16]
    result = {"key": key, "round": rnd, "data": describe(data), "request": request, "metrics": metrics,
              "num_examples": int(len(y)), "per_class_accuracy": _per_class(spec, weights, x, y, classes),
              "created": time.time(), "seconds": round(time.perf_counter() - t0, 3)}
    db[store.MODELS].update_one({"session": session, "round": rnd}, {"$set": {f"validations.{key}": result}})
    return result
