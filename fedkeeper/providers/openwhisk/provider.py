"""Apache OpenWhisk through its REST API (no `wsk` shell-outs).

Two HTTP stacks, one pool each, both keep-alive:
  * control plane (deploy, remove, exists, limits) through a `requests`
    Session: rare calls, where convenience wins;
  * the hot path (invoke, activation listing) through a urllib3 connection
    pool, the library `requests` itself is built on. `requests` costs about
    0.8 ms of client CPU per call on a 2-core machine, urllib3 about 0.3 ms;
    with a budget of 1 ms of keeper CPU per invocation, invoke alone could
    not afford `requests`.

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

import base64
import email.utils
import json
import logging
import os
import threading
import time
from typing import Any, Sequence
from urllib.parse import quote, urlencode, urlsplit

import requests
import urllib3

from ..base import (Artifact, DeployResult, ErrorClass, FunctionSpec, Invocation, Outcome, Provider,
                    ProviderContext, ProviderError, UploadPlan)
from . import metrics, packaging
from ..prometheus import ClusterMetrics
from .prices import IBM_CLOUD_FUNCTIONS

log = logging.getLogger("fedkeeper.providers.openwhisk")

LIST_PAGE = 200            # OpenWhisk's maximum list limit
MAX_PAGES = 25             # pages per poll (5,000 records); the per-id fallback covers the rest
CPU_SHARE = 0.10           # tracking may use this share of one core
MIN_POLL_S = 0.005
MAX_POLL_S = 0.25
FALLBACK_AFTER_S = 10.0    # ask for an id by itself once it is this old and unlisted
FALLBACK_MAX_S = 120.0
FALLBACK_PER_CALL = 4
UNKNOWN_SKEW_S = 300.0     # window before any Date header told the controller's clock
CONTROL_TIMEOUT = (5.0, 120.0)
HOT_TIMEOUT = urllib3.Timeout(connect=5.0, read=30.0)

_STATUS_BY_CODE = {0: "success", 1: "application error", 2: "action developer error",
                   3: "whisk internal error"}


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_text(data: bytes | str | None) -> str:
    if not data:
        return ""
    try:
        j = json.loads(data)
        if isinstance(j, dict) and j.get("error"):
            return str(j["error"])
    except (ValueError, TypeError):
        pass
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    return text.strip()[:300]


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
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json",
                         "Accept": "application/json", "User-Agent": "fedkeeper"}
        if not verify:
            log.warning("cluster %s: TLS certificate verification is disabled (insecure: true)",
                        self.cluster_name)
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self._session = requests.Session()
        self._session.headers.update(self._headers)
        self._session.verify = verify
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=16)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        kw: dict[str, Any] = {"maxsize": 32, "block": False, "retries": False, "timeout": HOT_TIMEOUT}
        if urlsplit(self.api_host).scheme == "https":
            if verify:
                # the CA bundle `requests` uses for the control plane, so that
                # a cluster's own CA (REQUESTS_CA_BUNDLE) is trusted on both
                ca = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
                      or requests.certs.where())
                kw.update(cert_reqs="CERT_REQUIRED", ca_certs=ca)
            else:
                kw.update(cert_reqs="CERT_NONE", assert_hostname=False)
        self._pool = urllib3.connection_from_url(self.api_host, **kw)
        self._lock = threading.Lock()
        # Invocations made here and not yet reported: id -> submission time.
        self._issued: dict[str, float] = {}
        # Finished records seen in a listing before anyone asked for them.
        self._seen: dict[str, dict] = {}
        self._fallback_at: dict[str, float] = {}
        self._next_poll = 0.0
        self._poll_cost = 0.0
        # Lower bound of (controller clock - keeper clock), seconds.
        self._offset_lo: float | None = clock_offset
        self._offset_known = clock_offset is not None
        self._next_date_sample = 0.0

    def _url(self, path: str) -> str:
        return self.api_host + self._prefix + path

    @classmethod
    def cluster_metrics(cls, cluster_name: str, cluster: Any, window: str | None, actions,
                        timeout_s: float = 10.0) -> ClusterMetrics:
        return metrics.cluster_metrics(cluster_name, cluster, window, actions, timeout_s)

    @classmethod
    def plan_upload(cls, cluster_name: str, cluster: Any, spec: FunctionSpec,
                    artifact: Artifact, code_limit: int | None = None) -> UploadPlan:
        api = cluster.api_host() if hasattr(cluster, "api_host") and getattr(cluster, "kind", "remote") == "remote" \
            else "the local fabric"
        return packaging.upload_plan(
            spec, artifact, cluster=cluster_name, target=f"{api} action {spec.name}",
            image_prefix=getattr(cluster, "image_registry", None),
            limit=code_limit or packaging.DEFAULT_CODE_SIZE_LIMIT,
            limit_source="the namespace's codeSize limit" if code_limit else "OpenWhisk's default codeSize")

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

    def _transport_error(self, exc: BaseException) -> ProviderError:
        text = str(exc)
        low = text.lower()
        if isinstance(exc, (requests.exceptions.SSLError, urllib3.exceptions.SSLError)) \
                or "ssl" in low or "certificate" in low:
            return ProviderError(ErrorClass.UNREACHABLE,
                                 f"TLS with {self._where()} failed ({type(exc).__name__}); if the cluster "
                                 "uses a self-signed certificate, trust it or set insecure: true for it")
        if "refused" in low:
            reason = "connection refused"
        elif "name or service not known" in low or "nodename nor servname" in low \
                or "name resolution" in low:
            reason = "host name not found"
        elif isinstance(exc, urllib3.exceptions.NewConnectionError):
            reason = "cannot connect"
        elif isinstance(exc, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)):
            return ProviderError(ErrorClass.UNREACHABLE, f"{self._where()} did not answer in time")
        elif isinstance(exc, urllib3.exceptions.ProtocolError):
            reason = "connection closed"
        else:
            reason = type(exc).__name__
        return ProviderError(ErrorClass.UNREACHABLE, f"cannot reach {self._where()} ({reason})")

    def _status_error(self, status: int, data: bytes | str | None, what: str,
                      headers: Any = None) -> ProviderError:
        detail = _error_text(data)
        msg = f"{what}: {self._where()} answered {status}" + (f": {detail}" if detail else "")
        if status in (401, 403):
            return ProviderError(ErrorClass.AUTH, msg + " (check the cluster's auth key)", status=status)
        if status == 404:
            return ProviderError(ErrorClass.FUNCTION_MISSING, msg, status=status)
        if status == 413:
            return ProviderError(ErrorClass.PAYLOAD_TOO_LARGE, msg, status=status)
        if status == 429:
            ra = _retry_after(headers.get("Retry-After") if headers is not None else None)
            return ProviderError(ErrorClass.THROTTLED, msg, retry_after=ra, status=status)
        if status >= 500 or status == 409:
            return ProviderError(ErrorClass.PLATFORM_ERROR, msg, status=status)
        return ProviderError(ErrorClass.APPLICATION_ERROR, msg, status=status)

    def _control(self, method: str, path: str, what: str, **kw) -> requests.Response:
        try:
            return self._session.request(method, self._url(path), timeout=CONTROL_TIMEOUT, **kw)
        except requests.exceptions.RequestException as exc:
            raise self._transport_error(exc) from None

    def _hot(self, method: str, url: str, body: bytes | None = None, retry_get: bool = True):
        try:
            return self._pool.urlopen(method, url, body=body, headers=self._headers,
                                      preload_content=True, assert_same_host=False)
        except urllib3.exceptions.ProtocolError as exc:
            # A kept-alive connection the server had closed: a GET is safe to
            # repeat; a POST is not (it may have created an activation).
            if method == "GET" and retry_get:
                return self._hot(method, url, body, retry_get=False)
            raise self._transport_error(exc) from None
        except urllib3.exceptions.HTTPError as exc:
            raise self._transport_error(exc) from None

    def _sample_clock(self, resp, received: float) -> None:
        if self._offset_known:
            return
        mono = time.monotonic()
        if mono < self._next_date_sample:
            return
        self._next_date_sample = mono + 1.0
        date = resp.headers.get("Date")
        if not date:
            return
        try:
            server = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        # The controller's clock read at least `server` when it answered, and
        # that was no later than `received` on ours.
        bound = server - received
        with self._lock:
            if self._offset_lo is None or bound > self._offset_lo:
                self._offset_lo = bound

    # ------------------------------------------------------------------ control plane
    def deploy(self, spec: FunctionSpec, artifact: Artifact) -> DeployResult:
        t0 = time.monotonic()
        path = f"/actions/{quote(spec.name, safe='/')}"
        r = self._control("GET", path, f"looking up action {spec.name}", params={"code": "false"})
        if r.status_code == 200:
            current = next((a.get("value") for a in r.json().get("annotations") or []
                            if isinstance(a, dict) and a.get("key") == "fk-sha256"), None)
            if current == artifact.sha256:
                return DeployResult(spec.name, True, time.monotonic() - t0, self._url(path))
        elif r.status_code != 404:
            raise self._status_error(r.status_code, r.content, f"looking up action {spec.name}", r.headers)
        plan = self.plan_upload(self.cluster_name, self.cluster, spec, artifact, self._code_limit())
        packaging.check_code_size(spec, artifact, plan.limit_bytes, self.cluster_name)
        body = {
            "exec": packaging.action_exec(spec, artifact, getattr(self.cluster, "image_registry", None)),
            "limits": {"memory": int(spec.memory_mb), "timeout": int(round(spec.timeout_s * 1000)),
                       "concurrency": int(spec.concurrency)},
            "parameters": [{"key": k, "value": v} for k, v in sorted(spec.bound.items())],
            "annotations": [{"key": "fk-sha256", "value": artifact.sha256},
                            {"key": "fk-source", "value": spec.source},
                            {"key": "final", "value": True},
                            # Only functions that invoke others get the namespace key.
                            {"key": "provide-api-key", "value": bool(spec.platform_api)}],
        }
        r = self._control("PUT", path, f"deploying action {spec.name}", params={"overwrite": "true"},
                          data=json.dumps(body).encode())
        if r.status_code != 200:
            raise self._status_error(r.status_code, r.content, f"deploying action {spec.name}", r.headers)
        return DeployResult(spec.name, False, time.monotonic() - t0, self._url(path))

    def remove(self, name: str) -> bool:
        r = self._control("DELETE", f"/actions/{quote(name, safe='/')}", f"removing action {name}")
        if r.status_code == 404:
            return False
        if r.status_code >= 300:
            raise self._status_error(r.status_code, r.content, f"removing action {name}", r.headers)
        return True

    def exists(self, name: str) -> bool:
        r = self._control("GET", f"/actions/{quote(name, safe='/')}", f"looking up action {name}",
                          params={"code": "false"})
        if r.status_code == 404:
            return False
        if r.status_code != 200:
            raise self._status_error(r.status_code, r.content, f"looking up action {name}", r.headers)
        return True

    def limits(self) -> dict[str, Any]:
        r = self._control("GET", "/limits", "reading namespace limits")
        if r.status_code != 200:
            raise self._status_error(r.status_code, r.content, "reading namespace limits", r.headers)
        return r.json()

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
        submitted = time.time()
        r = self._hot("POST", self._url(f"/actions/{quote(name, safe='/')}?blocking=false"), body)
        received = time.time()
        if r.status == 202 or r.status == 200:
            aid = r.headers.get("x-openwhisk-activation-id")
            if not aid:
                try:
                    aid = json.loads(r.data)["activationId"]
                except (ValueError, KeyError, TypeError):
                    raise ProviderError(ErrorClass.PLATFORM_ERROR,
                                        f"invoking {name}: {self._where()} answered {r.status} "
                                        "without an activation id") from None
            self._sample_clock(r, received)
            with self._lock:
                self._issued[aid] = submitted
            return Invocation(function=name, platform_id=aid, submitted_at=submitted,
                              payload_bytes=len(body))
        raise self._status_error(r.status, r.data, f"invoking {name}", r.headers)

    # ------------------------------------------------------------------ track
    def track(self, pending: Sequence[Invocation]) -> list[Outcome]:
        if not pending:
            return []
        want = {inv.platform_id: inv for inv in pending}
        out: list[Outcome] = []
        with self._lock:
            for aid in [a for a in want if a in self._seen]:
                out.append(self._outcome(self._seen.pop(aid)))
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
        finally:
            # Smoothed, so that one costly poll (a garbage collection, a burst
            # of pages) does not stall detection for long.
            cost = time.thread_time() - cpu0
            self._poll_cost = 0.7 * self._poll_cost + 0.3 * min(cost, 4 * self._poll_cost + 0.002)
            self._next_poll = time.monotonic() + min(MAX_POLL_S, max(MIN_POLL_S,
                                                                     self._poll_cost / CPU_SHARE))
        return out

    def _since_ms(self, want: dict[str, Invocation]) -> int:
        oldest = min(inv.submitted_at for inv in want.values())
        with self._lock:
            off = self._offset_lo
        if off is None:
            off = -UNKNOWN_SKEW_S
        # Same host: exact to the ms; otherwise a little slack for the
        # rounding of epoch milliseconds on both sides.
        slack = 0.001 if self._offset_known else 0.25
        return int((oldest + off - slack) * 1000)

    def _poll_list(self, want: dict[str, Invocation], out: list[Outcome]) -> None:
        params: dict[str, Any] = {"docs": "true", "limit": LIST_PAGE, "since": self._since_ms(want)}
        names = {inv.function for inv in want.values()}
        if len(names) == 1:
            params["name"] = next(iter(names))
        base = self._url("/activations?")
        for page_no in range(MAX_PAGES):
            params["skip"] = page_no * LIST_PAGE
            r = self._hot("GET", base + urlencode(params))
            if r.status != 200:
                raise self._status_error(r.status, r.data, "listing activations", r.headers)
            page = json.loads(r.data)
            if not isinstance(page, list):
                raise ProviderError(ErrorClass.PLATFORM_ERROR,
                                    f"listing activations: {self._where()} answered a non-list")
            with self._lock:
                for rec in page:
                    aid = rec.get("activationId") if isinstance(rec, dict) else None
                    if aid in want:
                        out.append(self._outcome(rec))
                        del want[aid]
                        self._forget(aid)
                    elif aid in self._issued:
                        self._seen[aid] = rec
            if len(page) < LIST_PAGE or not want:
                return

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
            r = self._hot("GET", self._url(f"/activations/{quote(aid, safe='')}"))
            if r.status == 200:
                out.append(self._outcome(json.loads(r.data)))
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

    @staticmethod
    def _outcome(rec: dict) -> Outcome:
        resp = rec.get("response") or {}
        status = resp.get("status") or _STATUS_BY_CODE.get(resp.get("statusCode", rec.get("statusCode")))
        result = resp.get("result")
        if result is not None and not isinstance(result, dict):
            result = {"value": result}
        ann = {a.get("key"): a.get("value") for a in rec.get("annotations") or () if isinstance(a, dict)}
        start = rec.get("start")
        end = rec.get("end")
        init_ms = ann.get("initTime")
        out = Outcome(platform_id=rec.get("activationId", ""), ok=status == "success", result=result,
                      start=start / 1000.0 if isinstance(start, (int, float)) else None,
                      end=end / 1000.0 if isinstance(end, (int, float)) and end else None,
                      duration_ms=rec.get("duration"), wait_ms=ann.get("waitTime"), init_ms=init_ms,
                      cold_start=init_ms is not None,
                      result_bytes=int(resp.get("size") or (len(json.dumps(result)) if result else 0)))
        if out.ok:
            return out
        err = result.get("error") if isinstance(result, dict) else None
        if err is not None and not isinstance(err, str):
            err = json.dumps(err)
        out.error = err or status or "failed"
        if status == "application error":
            out.error_class = ErrorClass.APPLICATION_ERROR
        elif status == "action developer error":
            timed_out = ann.get("timeout") is True or "exceeded its time limits" in (err or "")
            out.error_class = ErrorClass.TIMEOUT if timed_out else ErrorClass.DEVELOPER_ERROR
        else:
            out.error_class = ErrorClass.PLATFORM_ERROR
        return out

    def close(self) -> None:
        self._session.close()
        self._pool.close()
