"""Apache OpenWhisk through its REST API (no `wsk` shell-outs).

Two HTTP stacks, one pool each, both keep-alive:
  * control plane (deploy, remove, exists, limits) through a `requests`
    Session: rare calls, where convenience wins;
  * the hot path (invoke, activation listing) through a pool of the
    standard library's `http.client` connections (providers/keepalive.py
    says why: about 0.25 ms of client CPU per call on a 2-core machine,
    against 0.6 ms through urllib3; the budget is 0.5 ms of keeper CPU per
    invocation).

Tracking lists finished activations in batches instead of asking for each
one: one `GET /activations?docs=true&since=...&limit=200` (paged) serves every
pending invocation of the cluster. `since` is the oldest pending submission
time, moved onto the controller's clock by a lower bound of the clock offset
taken from the controller's `Date` headers, so no finished activation of ours
falls outside the window. How often the list is fetched adapts to its cost:
after a poll that took c seconds of CPU, the next one waits c / CPU_SHARE
(bounded to [MIN_POLL_S, MAX_POLL_S]), so tracking never takes more than
about CPU_SHARE of a core however many invocations are pending. Ids the list
has not shown after a while are fetched one by one (GET /activations/{id}),
with per-id backoff, in case the platform's listing (a database view on a
real controller) lags behind.

Bound configuration (FunctionSpec.bound: store URL, token secret, ...) is
deployed as action parameters, so OpenWhisk merges it into every
activation's args; the action is annotated `final: true`, so an invocation
cannot override a bound value (OpenWhisk then refuses it with 400). The
parameters are not marked `init`: OpenWhisk would hand those to the runtime
as environment variables at init instead of args, which the thin entries do
not expect. The key reaches the action only through `provide-api-key`.

TLS is verified unless the cluster says `insecure: true`. The auth key is
sent in a header only; it never appears in a URL, a message or a log line.
"""
from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from typing import Any, Sequence
from urllib.parse import quote, urlencode

import requests

from ..base import (Artifact, DeployResult, ErrorClass, FunctionSpec, Invocation, Outcome, Provider,
                    ProviderContext, ProviderError, UploadPlan)
from . import metrics, packaging
from .clock import ControllerClock
from .errors import activation_outcome, status_error, transport_error
from .http import BodyTooLarge, HotResponse, connections, read_bounded
from ..prometheus import ClusterMetrics
from .prices import IBM_CLOUD_FUNCTIONS

log = logging.getLogger("fedkeeper.providers.openwhisk")

LIST_PAGE = 200            # OpenWhisk's maximum list limit
MAX_PAGES = 25             # pages per poll (5,000 records); the per-id fallback covers the rest
# Bounds on what the hot path reads from a controller. An activation's result
# is at most 1 MB on OpenWhisk and ours are far smaller; a page of records
# past these bounds is refused before it is held whole.
HOT_ANSWER_MAX_BYTES = 2 * 1024 * 1024
#: One activation record: its result (1 MB at most) and its logs, which an
#: action may fill up to its `limits.logs` (10 MB at most on a stock
#: OpenWhisk), so a function that prints a lot still reports.
RECORD_MAX_BYTES = 12 * 1024 * 1024
#: OpenWhisk's longest blocking wait: an activation not ended by then is answered 202
BLOCKING_WAIT_S = 60.0
#: beyond the blocking wait, how long the answer to a blocking invoke may take to arrive
BLOCKING_READ_GRACE_S = 10.0
#: statuses whose blocking answer may be the ended activation's record (502:
#: an application or developer error, 500: a whisk error); other answers,
#: and these without a record, are the controller's own errors
BLOCKING_RECORD_STATUS = (200, 500, 502)
LIST_PAGE_MAX_BYTES = 32 * 1024 * 1024
MAX_ACTIVATION_ID = 64     # OpenWhisk's are 32 hex digits
CPU_SHARE = 0.10           # tracking may use this share of one core
MIN_POLL_S = 0.005
MAX_POLL_S = 0.25
FALLBACK_AFTER_S = 10.0    # ask for an id by itself once it is this old and unlisted
FALLBACK_MAX_S = 120.0
FALLBACK_PER_CALL = 4
CONTROL_TIMEOUT = (5.0, 120.0)
#: What the control plane's answers are read up to: an action without its
#: code, the namespace's limits, an error.
CONTROL_MAX_BYTES = 4 * 1024 * 1024
HOT_CONNECT_TIMEOUT_S = 5.0
HOT_READ_TIMEOUT_S = 30.0

class AnswerTooLarge(ProviderError):
    """A controller's answer past the bound the hot path reads."""


class OpenWhiskProvider(Provider):
    tracks_foreign_invocations = True  # activations are listed by id, whoever started them
    platform = "openwhisk"
    entry = "openwhisk"
    #: a self-hosted cluster has no list price; priced like the public
    #: service (prices.py), a cluster's `pricing` overrides
    default_prices = IBM_CLOUD_FUNCTIONS

    def __init__(self, cluster_name: str, cluster: Any, ctx: ProviderContext):
        super().__init__(cluster_name, cluster, ctx)
        try:
            auth = cluster.auth_pair()
        except ValueError as exc:
            raise ProviderError(ErrorClass.AUTH, f"cluster {cluster_name}: {exc}") from None
        self._connect(cluster.api_host(), auth, cluster.resolved_namespace(),
                      verify=not getattr(cluster, "insecure", False))

    # ------------------------------------------------------------------ plumbing
    def _connect(self, api_host: str, auth: tuple[str, str], namespace: str, verify: bool,
                 clock_offset: float | None = None) -> None:
        self.api_host = api_host.rstrip("/")
        self.namespace = namespace or "_"
        self._prefix = f"/api/v1/namespaces/{quote(self.namespace, safe='')}"
        self._verify = verify
        if not verify:
            log.warning("cluster %s: TLS certificate verification is disabled (insecure: true)",
                        self.cluster_name)
        self._headers, self._session, self._pool = connections(
            self.api_host, auth, verify, connect_timeout=HOT_CONNECT_TIMEOUT_S, read_timeout=HOT_READ_TIMEOUT_S)
        # A proxy the environment names for the controller (HTTPS_PROXY,
        # NO_PROXY): the hot path goes through it as the control plane does.
        self._proxied = requests.utils.select_proxy(
            self.api_host, requests.utils.get_environ_proxies(self.api_host)) is not None
        # path of each action's non-blocking invoke, quoted once
        self._invoke_paths: dict[str, str] = {}
        self._lock = threading.Lock()
        # Invocations made here and not yet reported: id -> submission time.
        self._issued: dict[str, float] = {}
        # Finished records seen in a listing before anyone asked for them.
        self._seen: dict[str, dict] = {}
        self._fallback_at: dict[str, float] = {}
        self._list_page = LIST_PAGE   # records per listing page; smaller while records are long
        self._next_poll = 0.0
        self._poll_cost = 0.0
        self._clock = ControllerClock(clock_offset)

    def _url(self, path: str) -> str:
        return self.api_host + self._prefix + path

    @classmethod
    def cluster_metrics(cls, cluster_name: str, cluster: Any, window: str | None, actions,
                        timeout_s: float = 10.0) -> ClusterMetrics:
        return metrics.cluster_metrics(cluster_name, cluster, cls.metrics_namespace(cluster_name, cluster),
                                       window, actions, timeout_s)

    @classmethod
    def metrics_namespace(cls, cluster_name: str, cluster: Any) -> str | None:
        """The namespace label the cluster's activations carry; None when the
        config leaves it to the key's default namespace ("_")."""
        ns = cluster.resolved_namespace()
        return None if ns in ("", "_") else ns

    @classmethod
    def plan_upload(cls, cluster_name: str, cluster: Any, spec: FunctionSpec,
                    artifact: Artifact, code_limit: int | None = None) -> UploadPlan:
        return packaging.upload_plan(spec, artifact, cluster_name, cluster, code_limit)

    def _code_limit(self) -> int | None:
        """The namespace's own code size limit where `GET /limits` reports
        one; asked once per provider."""
        if not hasattr(self, "_code_limit_value"):
            try:
                self._code_limit_value = packaging.namespace_code_limit(self.limits())
            except (ProviderError, ValueError) as exc:
                log.debug("limits of %s unavailable: %s", self.cluster_name, exc)
                self._code_limit_value = None
        return self._code_limit_value

    def _where(self) -> str:
        return f"OpenWhisk cluster {self.cluster_name} at {self.api_host}"

    def _status_error(self, status: int, data: bytes | str | None, what: str,
                      headers: Any = None) -> ProviderError:
        return status_error(self._where(), status, data, what, headers)

    def _control(self, method: str, path: str, *, params: dict[str, str] | None = None,
                 data: bytes | None = None) -> HotResponse:
        """A control-plane request. Its answer is read up to
        CONTROL_MAX_BYTES: a longer one is cut there when only its status
        matters (a PUT echoes the action, code included), else refused."""
        return self._via_session(method, path, body=data, params=params, max_bytes=CONTROL_MAX_BYTES,
                                 timeout=CONTROL_TIMEOUT, cut=method in ("PUT", "DELETE"))

    def _via_session(self, method: str, path: str, *, body: bytes | None, max_bytes: int,
                     timeout: tuple[float, float], params: dict[str, str] | None = None,
                     cut: bool = False) -> HotResponse:
        """A request through the requests session (which honours the
        environment's proxy), its answer bounded (`cut`: truncated at the
        bound rather than refused)."""
        try:
            r = self._session.request(method, self._url(path), params=params, data=body, stream=True,
                                      allow_redirects=False, timeout=timeout)
        except requests.exceptions.RequestException as exc:
            raise transport_error(self._where(), exc) from None
        try:
            data = read_bounded(r.iter_content(65536), max_bytes, cut=cut)
        except BodyTooLarge:
            raise self._too_large(method, path, max_bytes) from None
        except requests.exceptions.RequestException as exc:
            raise transport_error(self._where(), exc) from None
        finally:
            r.close()
        return HotResponse(r.status_code, r.headers, data)

    def _too_large(self, method: str, path: str, max_bytes: int) -> AnswerTooLarge:
        return AnswerTooLarge(ErrorClass.PLATFORM_ERROR, f"{self._where()} answered more than {max_bytes} bytes "
                                                         f"to {method} {path.split('?', 1)[0]}")

    def _hot(self, method: str, path: str, body: bytes | None = None, *,
             max_bytes: int = HOT_ANSWER_MAX_BYTES, read_timeout: float | None = None) -> HotResponse:
        """`path` below the namespace; the pool repeats a GET that met a
        kept-alive connection the server had closed, never a POST."""
        if self._proxied:
            return self._hot_via_proxy(method, path, body, max_bytes, read_timeout)
        try:
            return self._pool.request(method, self._prefix + path, body, max_bytes=max_bytes,
                                      read_timeout=read_timeout)
        except BodyTooLarge:
            raise self._too_large(method, path, max_bytes) from None
        except (http.client.HTTPException, OSError) as exc:
            raise transport_error(self._where(), exc) from None

    def _hot_via_proxy(self, method: str, path: str, body: bytes | None, max_bytes: int,
                       read_timeout: float | None) -> HotResponse:
        return self._via_session(method, path, body=body, max_bytes=max_bytes,
                                 timeout=(HOT_CONNECT_TIMEOUT_S, read_timeout or HOT_READ_TIMEOUT_S))

    def _ok_answer(self, r: HotResponse, what: str, kind: type) -> Any:
        """The JSON `kind` (dict or list) a request answered with 200; else
        the controller's error, or a platform error naming what was asked."""
        if r.status != 200:
            raise self._status_error(r.status, r.data, what, r.headers)
        value = self._json_answer(r, what)
        if not isinstance(value, kind):
            raise ProviderError(ErrorClass.PLATFORM_ERROR, f"{what}: {self._where()} answered a non-"
                                                           f"{'object' if kind is dict else 'list'}")
        return value

    def _json_answer(self, r: HotResponse, what: str) -> Any:
        """A controller's JSON answer, or a platform error naming what was
        asked (never a traceback from a bad answer)."""
        try:
            return json.loads(r.data)
        except (ValueError, RecursionError):
            raise ProviderError(ErrorClass.PLATFORM_ERROR,
                                f"{what}: {self._where()} answered {r.status} with no valid JSON") from None

    # ------------------------------------------------------------------ control plane
    def deploy(self, spec: FunctionSpec, artifact: Artifact) -> DeployResult:
        t0 = time.monotonic()
        path = f"/actions/{quote(spec.name, safe='/')}"
        exec_ = packaging.action_exec(spec, artifact, getattr(self.cluster, "image_registry", None))
        parameters = dict(spec.bound)
        if spec.platform_api and getattr(self.cluster, "insecure", False):
            # It calls the controller too, which the cluster says has a certificate not to verify.
            parameters["FK_OW_INSECURE"] = "1"
        # What the action runs on: the image follows the runtime's pins, the
        # base image and the cluster's registry, none of which is in the zip;
        # and what the provider adds to its parameters.
        runs_on = " ".join(filter(None, (exec_["kind"], exec_.get("image"),
                                         "insecure" if "FK_OW_INSECURE" in parameters else None)))
        r = self._control("GET", path, params={"code": "false"})
        if r.status == 200:
            action = self._json_answer(r, f"looking up action {spec.name}")
            annotations = action.get("annotations") if isinstance(action, dict) else None
            marks = {a.get("key"): a.get("value") for a in annotations
                     if isinstance(a, dict)} if isinstance(annotations, list) else {}
            if marks.get("fk-sha256") == artifact.sha256 and marks.get("fk-exec") == runs_on:
                return DeployResult(spec.name, True, time.monotonic() - t0, self._url(path))
        elif r.status != 404:
            raise self._status_error(r.status, r.data, f"looking up action {spec.name}", r.headers)
        plan = self.plan_upload(self.cluster_name, self.cluster, spec, artifact, self._code_limit())
        packaging.check_code_size(spec, artifact, plan.limit_bytes, self.cluster_name)
        body = {
            "exec": exec_,
            "limits": {"memory": int(spec.memory_mb), "timeout": int(round(spec.timeout_s * 1000)),
                       "concurrency": int(spec.concurrency)},
            "parameters": [{"key": k, "value": v} for k, v in sorted(parameters.items())],
            "annotations": [{"key": "fk-sha256", "value": artifact.sha256},
                            {"key": "fk-exec", "value": runs_on},
                            {"key": "fk-source", "value": spec.source},
                            {"key": "final", "value": True},
                            # Only functions that invoke others get the namespace key.
                            {"key": "provide-api-key", "value": bool(spec.platform_api)}],
        }
        r = self._control("PUT", path, params={"overwrite": "true"}, data=json.dumps(body).encode())
        if r.status != 200:
            raise self._status_error(r.status, r.data, f"deploying action {spec.name}", r.headers)
        return DeployResult(spec.name, False, time.monotonic() - t0, self._url(path))

    def remove(self, name: str) -> bool:
        r = self._control("DELETE", f"/actions/{quote(name, safe='/')}")
        if r.status == 404:
            return False
        if r.status >= 300:
            raise self._status_error(r.status, r.data, f"removing action {name}", r.headers)
        return True

    def exists(self, name: str) -> bool:
        r = self._control("GET", f"/actions/{quote(name, safe='/')}", params={"code": "false"})
        if r.status == 404:
            return False
        if r.status != 200:
            raise self._status_error(r.status, r.data, f"looking up action {name}", r.headers)
        return True

    def limits(self) -> dict[str, Any]:
        return self._ok_answer(self._control("GET", "/limits"), "reading namespace limits", dict)

    def capacity_warning(self, n: int) -> str | None:
        """A warning when n concurrent invocations exceed the namespace's
        concurrentInvocations limit (the excess is answered 429 and retried)."""
        try:
            lim = self.limits().get("concurrentInvocations")
        except ProviderError as exc:
            log.debug("limits of %s unavailable: %s", self.cluster_name, exc)
            return None
        if isinstance(lim, int) and n > lim:
            return (f"cluster {self.cluster_name}: {n} concurrent invocations exceed the namespace's "
                    f"concurrentInvocations limit of {lim}; the excess will be throttled (429) and retried")
        return None

    # ------------------------------------------------------------------ invoke
    def invoke(self, name: str, payload: dict[str, Any]) -> Invocation:
        body = json.dumps(payload, separators=(",", ":")).encode()
        path = self._invoke_paths.get(name)
        if path is None:
            path = self._invoke_paths[name] = f"/actions/{quote(name, safe='/')}?blocking=false"
        submitted = time.time()
        r = self._hot("POST", path, body)
        self._clock.sample(r.headers, time.time())
        if r.status == 202 or r.status == 200:
            return self._accepted(r, name, submitted, len(body))
        raise self._status_error(r.status, r.data, f"invoking {name}", r.headers)

    def _accepted(self, r: HotResponse, name: str, submitted: float, body_bytes: int) -> Invocation:
        """The Invocation of an activation the controller accepted (its id
        in a header or the answer), remembered as this keeper's."""
        aid = r.headers.get("x-openwhisk-activation-id")
        if not aid:
            answer = self._json_answer(r, f"invoking {name}")
            aid = answer.get("activationId") if isinstance(answer, dict) else None
            if not isinstance(aid, str) or not aid or len(aid) > MAX_ACTIVATION_ID:
                raise ProviderError(ErrorClass.PLATFORM_ERROR,
                                    f"invoking {name}: {self._where()} answered {r.status} "
                                    "without an activation id")
        with self._lock:
            self._issued[aid] = submitted
        return Invocation(function=name, platform_id=aid, submitted_at=submitted, payload_bytes=body_bytes)

    def call(self, name: str, payload: dict[str, Any], timeout_s: float, poll_s: float = 0.05) -> Outcome:
        """Invoke and wait in one blocking request, as `wsk action invoke
        --blocking` does: the controller answers with the activation record
        once it ends, so a helper's outcome (init, an aggregation) is seen
        when it lands, not at the next poll, which comes a tenth of the
        wait so far later (0.3 s late for a 3 s aggregation). OpenWhisk
        waits at most BLOCKING_WAIT_S, then answers 202 with the
        activation id: that one is polled, as a non-blocking invoke is."""
        wait_s = max(0.001, min(timeout_s, BLOCKING_WAIT_S))
        body = json.dumps(payload, separators=(",", ":")).encode()
        path = f"/actions/{quote(name, safe='/')}?blocking=true&timeout={int(wait_s * 1000)}"
        started, submitted = time.monotonic(), time.time()
        r = self._hot("POST", path, body, max_bytes=RECORD_MAX_BYTES, read_timeout=wait_s + BLOCKING_READ_GRACE_S)
        self._clock.sample(r.headers, time.time())
        if r.status != 202:
            rec = self._json_answer(r, f"invoking {name}") if r.status in BLOCKING_RECORD_STATUS else None
            if not isinstance(rec, dict) or not isinstance(rec.get("response"), dict):
                raise self._status_error(r.status, r.data, f"invoking {name}", r.headers)
            return activation_outcome(rec)
        inv = self._accepted(r, name, submitted, len(body))
        return self.wait(inv, max(0.0, timeout_s - (time.monotonic() - started)), poll_s)

    # ------------------------------------------------------------------ track
    def track(self, pending: Sequence[Invocation]) -> list[Outcome]:
        if not pending:
            return []
        want = {inv.platform_id: inv for inv in pending}
        out: list[Outcome] = []
        with self._lock:
            for aid in [a for a in want if a in self._seen]:
                out.append(activation_outcome(self._seen.pop(aid)))
                self._forget(aid)
                del want[aid]
        if not want:
            return out
        mono = time.monotonic()
        if mono < self._next_poll:
            return out
        cpu0 = time.thread_time()
        try:
            self._poll_list(want, out)
            self._poll_fallback(want, out)
        except ProviderError:
            # The outcomes this pass found are forgotten here once returned:
            # hand them over; the failure, if it lasts, is met next pass.
            if not out:
                raise
        finally:
            # Smoothed, so that one costly poll (a garbage collection, a burst
            # of pages) does not stall detection for long.
            cost = time.thread_time() - cpu0
            self._poll_cost = 0.7 * self._poll_cost + 0.3 * min(cost, 4 * self._poll_cost + 0.002)
            self._next_poll = time.monotonic() + min(MAX_POLL_S, max(MIN_POLL_S,
                                                                     self._poll_cost / CPU_SHARE))
        return out

    def _poll_list(self, want: dict[str, Invocation], out: list[Outcome]) -> None:
        since = self._clock.since_ms(min(inv.submitted_at for inv in want.values()))
        params: dict[str, Any] = {"docs": "true", "since": since}
        names = {inv.function for inv in want.values()}
        if len(names) == 1:
            params["name"] = next(iter(names))
        base = "/activations?"
        skip, pages = 0, 0
        # Pages read, plus the retries of pages refused as too long (a
        # refused page costs the controller nothing the read page would not).
        for _ in range(2 * MAX_PAGES):
            if pages >= MAX_PAGES:
                return
            params.update(skip=skip, limit=self._list_page)
            try:
                r = self._hot("GET", base + urlencode(params), max_bytes=LIST_PAGE_MAX_BYTES)
            except AnswerTooLarge:
                # Records with long logs: this page again in smaller pages,
                # down to one record; a record too large even alone is left
                # to the per-id read, which reports it as failed.
                if self._list_page == 1:
                    skip, pages = skip + 1, pages + 1
                self._list_page = max(1, self._list_page // 4)
                continue
            pages += 1
            page = self._ok_answer(r, "listing activations", list)
            with self._lock:
                for rec in page:
                    aid = rec.get("activationId") if isinstance(rec, dict) else None
                    if not isinstance(aid, str):
                        continue
                    if aid in want:
                        out.append(activation_outcome(rec))
                        del want[aid]
                        self._forget(aid)
                    elif aid in self._issued:
                        # kept until asked for (an abandoned one for hours): not its logs
                        self._seen[aid] = {k: v for k, v in rec.items() if k != "logs"}
            full = len(page) >= self._list_page
            # Back towards full pages after every page read: the long records
            # that shrank them are usually a few among many.
            self._list_page = min(LIST_PAGE, self._list_page * 2)
            if not full or not want:
                return
            skip += len(page)

    def _poll_fallback(self, want: dict[str, Invocation], out: list[Outcome]) -> None:
        now = time.time()
        asked = 0
        for aid, inv in list(want.items()):
            if asked >= FALLBACK_PER_CALL:
                break
            age = now - inv.submitted_at
            if age < FALLBACK_AFTER_S or now < self._fallback_at.get(aid, 0.0):
                continue
            asked += 1
            try:
                r = self._hot("GET", f"/activations/{quote(aid, safe='')}", max_bytes=RECORD_MAX_BYTES)
            except AnswerTooLarge as exc:
                # Its outcome cannot be read: a failure of its own, not of
                # the tracking of every other invocation.
                out.append(Outcome(aid, False, ErrorClass.PLATFORM_ERROR, f"its activation record: {exc}"))
                del want[aid]
                with self._lock:
                    self._forget(aid)
                continue
            if r.status == 200:
                rec = self._json_answer(r, "reading an activation")
                if not isinstance(rec, dict):
                    raise ProviderError(ErrorClass.PLATFORM_ERROR,
                                        f"reading an activation: {self._where()} answered a non-object")
                out.append(activation_outcome(rec))
                del want[aid]
                with self._lock:
                    self._forget(aid)
            elif r.status == 404:  # still running
                self._fallback_at[aid] = now + min(FALLBACK_MAX_S, max(FALLBACK_AFTER_S, age))
            else:
                raise self._status_error(r.status, r.data, "reading an activation", r.headers)

    def _forget(self, aid: str) -> None:
        self._issued.pop(aid, None)
        self._fallback_at.pop(aid, None)
        self._seen.pop(aid, None)
        if len(self._issued) > 100000:
            # Invocations abandoned by the keeper: drop the oldest.
            cutoff = time.time() - 6 * 3600
            for k in [k for k, t in self._issued.items() if t < cutoff]:
                self._issued.pop(k, None)
                self._seen.pop(k, None)
                self._fallback_at.pop(k, None)

    def close(self) -> None:
        self._session.close()
        self._pool.close()
