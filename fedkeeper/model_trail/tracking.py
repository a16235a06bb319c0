"""`fedkeeper report --mlflow [URI]`: each session as an MLflow run.

A run per session, in the experiment named after the config (`name`):
parameters from the session's spec and training settings, the per-round
metrics of its global models (step = the round, from 1), its validations,
and the final model as artifacts (`model/final.npz`, and `model/final.keras`
where the architecture can be rebuilt). Logging a session again replaces
its run, so the tracking server holds one run per session.

MLflow is optional (`pip install 'fedkeeper[mlflow]'`, the client-only
mlflow-skinny). A URI without a scheme is a local folder used as a file
store; MLflow 3 keeps that backend in maintenance mode behind
MLFLOW_ALLOW_FILE_STORE, which this module sets for such URIs only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from flcommon.urls import masked

from .catalog import ModelTrailError, model_docs, validation_rows
from .code import session_code
from .export import export_model

DEFAULT_URI = "mlruns"
# What MLflow accepts in a metric name, and how long one may be.
_NOT_IN_METRIC_NAMES = re.compile(r"[^A-Za-z0-9_\-. :/]")
MAX_METRIC_NAME = 250
SESSION_TAG = "fedkeeper.session"
MAX_PARAM_CHARS = 500


class TrackingError(RuntimeError):
    """MLflow is missing, or the tracking server refused what was logged."""


def tracking_uri(uri: str | None) -> str:
    uri = uri or DEFAULT_URI
    if "://" in uri or uri.startswith("file:"):
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and (len(value) > 20 or any(isinstance(v, (dict, list)) for v in value)):
        out[prefix] = f"{len(value)} items"
    else:   # a session stored before specs dropped URLs' user info may still hold some
        out[prefix] = masked(str(value))[:MAX_PARAM_CHARS]


def session_params(doc: dict[str, Any]) -> dict[str, str]:
    """The session's spec (model, data, partition, optimizer, strategy,
    mode, user module) and training settings, flattened to dotted keys."""
    spec = dict(doc.get("spec") or {})
    clients = spec.pop("clients", [])
    out: dict[str, str] = {"clients": str(len(clients))}
    _flat("", spec, out)
    _flat("training", doc.get("training") or {}, out)
    return {k: v for k, v in out.items() if k}


def metric_name(text: str) -> str:
    """`text` as an MLflow metric name: any URL's user info masked, the
    characters MLflow refuses (`***@`, a query) as `_`. MLflow also takes a
    name for a file path and refuses one that a path would normalise (a
    URL's `//`): its slashes then become `_` too. A name longer than
    MAX_METRIC_NAME keeps its last part (`.accuracy`) and gets a short hash
    of the whole in place of its middle, so that two long names stay two."""
    name = _NOT_IN_METRIC_NAMES.sub("_", masked(text))
    norm = posixpath.normpath(name)
    if norm != name or norm.startswith(("..", "/")):
        name = name.replace("/", "_")
    if len(name) > MAX_METRIC_NAME:
        head, dot, tail = name.rpartition(".")
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{head[:MAX_METRIC_NAME - len(tail) - len(digest) - 2]}-{digest}{dot}{tail}"
    return name


def session_metrics(store, session: str) -> list[tuple[str, float, int]]:
    """(key, value, step) for every model round and validation."""
    out: list[tuple[str, float, int]] = []
    for m in model_docs(store, session):
        step = int(m["round"])
        for key, value in (m.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                out.append((key, float(value), step))
        for key in ("num_examples", "accepted"):
            if isinstance(m.get(key), (int, float)):
                out.append((key, float(m[key]), step))
    for r in store.rounds(session):
        if isinstance(r.get("duration_s"), (int, float)):
            out.append(("round_seconds", float(r["duration_s"]), int(r["round"]) + 1))
    for v in validation_rows(store, session):
        if isinstance(v.get("accuracy"), (int, float)):
            out.append((metric_name(f"validation.{v['data']}.accuracy"), float(v["accuracy"]), v["model"]))
    return out


def _model_files(store, doc: dict[str, Any], module_path, folder: Path) -> list[Path]:
    models = model_docs(store, doc["_id"])
    if not models:
        return []
    final = models[-1]
    files = [Path(export_model(store, doc["_id"], doc.get("spec") or {}, final, folder / "final.npz")["file"])]
    try:
        code = session_code(doc, module_path)
        files.append(Path(export_model(store, doc["_id"], doc["spec"], final, folder / "final.keras", code)["file"]))
    except ModelTrailError:
        pass  # the raw weights are there; the architecture cannot be rebuilt
    trail = {k: v for k, v in (final.get("trail") or {}).items() if k != "parent_blob"}
    (folder / "final_trail.json").write_text(json.dumps({"round": final["round"], "trail": trail}, default=str))
    return files + [folder / "final_trail.json"]


def _log_run(client, rid: str, store, doc: dict[str, Any], module_path) -> tuple[list, list]:
    """Log one session's parameters, metrics and model files to run `rid`
    and end it; (params, metrics) logged."""
    from mlflow.entities import Metric, Param   # log_sessions checked that MLflow is there
    sid = doc["_id"]
    now = int(time.time() * 1000)
    params = [Param(k, v) for k, v in sorted(session_params(doc).items())]
    metrics = [Metric(k, v, now, step) for k, v, step in session_metrics(store, sid)]
    for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
        client.log_batch(rid, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i:i + 1000])
    if doc.get("final_accuracy") is not None:
        client.set_tag(rid, "fedkeeper.final_accuracy", str(doc["final_accuracy"]))
    with tempfile.TemporaryDirectory() as tmp:
        for path in _model_files(store, doc, module_path, Path(tmp)):
            client.log_artifact(rid, str(path), artifact_path="model")
    client.set_terminated(rid, status="FINISHED" if doc.get("state") == "finished" else "FAILED",
                          end_time=int(1000 * doc["ended"]) if doc.get("ended") else None)
    return params, metrics


def log_sessions(store, session_ids: list[str], uri: str | None = None, module_path=None) -> list[dict[str, Any]]:
    """Log each session as one MLflow run; returns where each went."""
    target = tracking_uri(uri)
    if target.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("MLflow is not installed: pip install 'fedkeeper[mlflow]'") from None
    client = MlflowClient(tracking_uri=target)
    logged = []
    try:
        for sid in session_ids:
            doc = store.session(sid)
            if doc is None:
                raise TrackingError(f"no session {sid!r} in the store")
            name = doc.get("name") or "fedkeeper"
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
            earlier = [r.info.run_id for r in
                       client.search_runs([exp_id], filter_string=f"tags.`{SESSION_TAG}` = '{sid}'")]
            run = client.create_run(exp_id, run_name=sid, start_time=int(1000 * (doc.get("created") or time.time())),
                                    tags={SESSION_TAG: sid, "fedkeeper.state": str(doc.get("state"))})
            rid = run.info.run_id
            try:
                params, metrics = _log_run(client, rid, store, doc, module_path)
            except BaseException:
                # The session's earlier run stays; this half-logged one goes.
                with contextlib.suppress(Exception):
                    client.delete_run(rid)
                raise
            for old in earlier:   # replaced only once the new run is complete
                client.delete_run(old)
            logged.append({"session": sid, "run_id": rid, "experiment": name, "uri": target,
                           "metrics": len(metrics), "params": len(params)})
    except MlflowException as exc:
        raise TrackingError(f"MLflow at {target}: {exc.message}") from None
    return logged
