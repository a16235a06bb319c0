"""fl_invoker: fan client invocations out from inside a cluster.

The keeper sends one small payload per cluster (the already signed client
payloads, a few hundred bytes each) instead of one request per client over a
possibly slow link; the invoker submits them concurrently and records each
platform id on the attempt's invocation document, where the keeper tracks it.
On OpenWhisk it uses the controller address and key the platform gives an
action (__OW_API_HOST / __OW_API_KEY, with the provide-api-key annotation);
on HTTP platforms it posts to the client function's URL (FK_CLIENT_URL).
"""
from __future__ import annotations

import base64
import json
import os
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flcommon import store
from flcommon.context import database, ids
from flcommon.entry import BadRequest, require


def _post(url: str, body: dict[str, Any], headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _invoke_openwhisk(target: str, call: dict[str, Any]) -> str:
    host = os.environ["__OW_API_HOST"].rstrip("/")
    ns = os.environ.get("__OW_NAMESPACE", "_")
    auth = base64.b64encode(os.environ["__OW_API_KEY"].encode()).decode()
    status, body = _post(f"{host}/api/v1/namespaces/{ns}/actions/{target}?blocking=false", call,
                         {"Authorization": f"Basic {auth}"}, timeout=30)
    if status != 202:
        raise RuntimeError(f"invoke answered {status}: {body[:200]!r}")
    return json.loads(body)["activationId"]


def _invoke_http(url: str, call: dict[str, Any]) -> str:
    # HTTP functions answer when they finish, so the call is sent and the
    # execution id returned at once; the thread keeps waiting for the answer.
    exec_id = uuid.uuid4().hex
    _pool.submit(_post, url, call, {"Function-Execution-Id": exec_id}, 600)
    return exec_id


_pool = ThreadPoolExecutor(max_workers=32)


def handle(payload: dict[str, Any], bound: dict[str, str]) -> dict[str, Any]:
    session, rnd = ids(payload)
    target = require(payload, "target", str)
    calls = require(payload, "calls", list)
    if not all(isinstance(c, dict) and isinstance(c.get("client"), str) for c in calls):
        raise BadRequest("calls must be a list of client payloads")
    if os.environ.get("__OW_API_HOST") and os.environ.get("__OW_API_KEY"):
        invoke = lambda call: _invoke_openwhisk(target, call)  # noqa: E731
    elif bound.get("FK_CLIENT_URL"):
        invoke = lambda call: _invoke_http(bound["FK_CLIENT_URL"], call)  # noqa: E731
    else:
        raise BadRequest("no way to invoke clients from here (no __OW_API_KEY, no FK_CLIENT_URL)")
    db = database(bound)

    def one(call: dict[str, Any]) -> dict[str, Any]:
        try:
            pid = invoke(call)
        except Exception as exc:  # reported per client; the keeper retries it
            return {"client": call["client"], "error": str(exc)[:300]}
        db[store.INVOCATIONS].update_one(
            {"session": session, "round": rnd, "client": call["client"], "attempt": call.get("attempt")},
            {"$set": {"platform_id": pid, "state": "running", "via": "invoker"}})
        return {"client": call["client"], "platform_id": pid}

    with ThreadPoolExecutor(max_workers=min(32, max(1, len(calls)))) as ex:
        results = list(ex.map(one, calls))
    return {"invoked": sum("platform_id" in r for r in results),
            "failed": [r for r in results if "error" in r]}
