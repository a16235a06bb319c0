"""fl_invoker: fan client invocations out from inside a cluster.

The keeper sends one small payload per cluster (the already signed client
payloads, a few hundred bytes each) instead of one request per client over a
possibly slow link; the invoker submits them concurrently and records each
platform id on the attempt's invocation document, where the keeper tracks it.

Payload: {session, round, target: function name, calls: [signed client
payloads {client, attempt, token, ...}]}.
The client payloads are forwarded untouched: their tokens were made by the
keeper, the invoker cannot (and need not) sign anything.

- OpenWhisk: the controller address and key the platform gives an action
  (__OW_API_HOST / __OW_API_KEY, present when the action is deployed with
  the provide-api-key annotation) and the REST invoke
  POST /api/v1/namespaces/NS/actions/NAME?blocking=false -> 202 {activationId}.
  The controller's certificate is verified, unless the cluster is
  configured `insecure: true` (a self-signed controller, as the keeper's own
  calls to it are then made): the provider binds FK_OW_INSECURE to it.
- HTTP platforms: a POST to the client function's URL (bound as
  FK_CLIENT_URL). An HTTP function answers only when it has finished, so the
  request is sent completely (the client is then running) before the
  invoker records it; the answer is read by a background thread. The
  recorded id is the one sent as Function-Execution-Id.
Result: {invoked: n, failed: [{client, error}]}: never anything else.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flcommon import store
from flcommon.context import database, ids
from flcommon.entry import BadRequest, require

MAX_CALLS = 200
# Reads the answers of HTTP invocations after the invoker has recorded them.
_readers = ThreadPoolExecutor(max_workers=64, thread_name_prefix="fk-answer")


def _invoke_openwhisk(target: str, call: dict[str, Any], timeout: float = 30.0,
                      context: ssl.SSLContext | None = None) -> str:
    host = os.environ["__OW_API_HOST"].rstrip("/")
    if "://" not in host:
        host = "https://" + host
    auth = base64.b64encode(os.environ["__OW_API_KEY"].encode()).decode()
    # The target lives next to the invoker, in the namespace it runs in.
    ns = urllib.parse.quote(os.environ.get("__OW_NAMESPACE") or "_")
    url = f"{host}/api/v1/namespaces/{ns}/actions/{urllib.parse.quote(target)}?blocking=false"
    req = urllib.request.Request(url, data=json.dumps(call).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    if status != 202:
        raise RuntimeError(f"invoke answered {status}: {body[:200].decode('utf-8', 'replace')}")
    return str(json.loads(body)["activationId"])


def _drain(conn: http.client.HTTPConnection) -> None:
    try:
        conn.getresponse().read()
    except OSError:
        pass  # the keeper sees the outcome in the store (or its absence)
    finally:
        conn.close()


def _invoke_http(url: str, call: dict[str, Any], timeout: float = 600.0) -> str:
    parts = urllib.parse.urlsplit(url)
    conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_type(parts.netloc, timeout=timeout)
    exec_id = uuid.uuid4().hex
    try:
        conn.request("POST", parts.path or "/", body=json.dumps(call).encode(),
                     headers={"Content-Type": "application/json", "Function-Execution-Id": exec_id})
    except OSError:
        conn.close()
        raise
    _readers.submit(_drain, conn)
    return exec_id


def handle(payload: dict[str, Any], bound: dict[str, str]) -> dict[str, Any]:
    session, rnd = ids(payload)
    target = require(payload, "target", str)
    calls = payload.get("calls")
    if not isinstance(calls, list) or not calls or len(calls) > MAX_CALLS or not all(
            isinstance(c.get("client"), str) and isinstance(c.get("token"), str) for c in calls):
        raise BadRequest(f"calls must be a list of 1..{MAX_CALLS} signed client payloads")
    if os.environ.get("__OW_API_HOST") and os.environ.get("__OW_API_KEY"):
        context = ssl._create_unverified_context() if bound.get("FK_OW_INSECURE") == "1" else None

        def invoke(call):
            return _invoke_openwhisk(target, call, context=context)
    elif bound.get("FK_CLIENT_URL"):
        def invoke(call):
            return _invoke_http(bound["FK_CLIENT_URL"], call)
    else:
        raise BadRequest("no way to invoke clients from here (no __OW_API_KEY, no FK_CLIENT_URL)")
    db = database(bound)

    def one(call: dict[str, Any]) -> dict[str, Any]:
        try:
            pid = invoke(call)
        except Exception as exc:  # noqa: BLE001 - reported per client; the keeper retries it
            return {"client": call["client"], "error": f"{type(exc).__name__}: {exc}"[:300]}
        db[store.INVOCATIONS].update_one(
            {"session": session, "round": rnd, "client": call["client"], "attempt": call.get("attempt")},
            {"$set": {"platform_id": pid, "state": "running", "via": "invoker"}})
        return {"client": call["client"], "platform_id": pid}

    with ThreadPoolExecutor(max_workers=min(32, len(calls))) as ex:
        results = list(ex.map(one, calls))
    return {"invoked": sum("platform_id" in r for r in results),
            "failed": [r for r in results if "error" in r][:50]}
