"""The one interface every platform implements.

The keeper only ever talks to `Provider`. It acts on `ErrorClass` alone, never
on a platform name or status string: each provider maps its platform's
statuses and HTTP codes onto these classes.
"""
from __future__ import annotations

import time
from pathlib import Path
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, ClassVar, Iterable, Sequence

from flcommon.urls import masked

from .prometheus import ClusterMetrics


class ErrorClass(str, Enum):
    THROTTLED = "throttled"                  # 429 and friends; honour retry_after
    PAYLOAD_TOO_LARGE = "payload_too_large"  # 413; never retried
    APPLICATION_ERROR = "application_error"  # the function returned an error
    DEVELOPER_ERROR = "developer_error"      # the function crashed
    TIMEOUT = "timeout"                      # exceeded its time limit
    PLATFORM_ERROR = "platform_error"        # internal error of the platform
    FUNCTION_MISSING = "function_missing"    # redeploy, then retry
    UNREACHABLE = "unreachable"              # connection refused / DNS / TLS
    AUTH = "auth"                            # 401/403; never retried

    @property
    def retryable(self) -> bool:
        return self not in (ErrorClass.PAYLOAD_TOO_LARGE, ErrorClass.AUTH)


class ProviderError(Exception):
    """A control- or data-plane call failed, already classified."""

    def __init__(self, error_class: ErrorClass, message: str, *,
                 retry_after: float | None = None, status: int | None = None):
        # Messages are shown, logged and stored with the attempt: a URL's
        # user info (a key an endpoint was written with, quoted by a client
        # library) never goes with them.
        super().__init__(masked(message))
        self.error_class = error_class
        self.retry_after = retry_after
        self.status = status

    def __str__(self) -> str:
        return f"{self.error_class.value}: {self.args[0]}"


@dataclass(frozen=True)
class FunctionSpec:
    """What to deploy: a function folder under functions/ and its limits.

    `bound` holds configuration bound to the function at deploy time (store
    URL, database, token secret). It may contain secrets: providers pass it to
    the platform (action parameters, env vars) and never log it.
    """

    name: str                 # the deployed name, e.g. "fl_client"
    source: str               # the folder under functions/, e.g. "fl_client"
    memory_mb: int = 256
    timeout_s: float = 60.0
    concurrency: int = 1
    bound: dict[str, str] = field(default_factory=dict)
    image: str | None = None  # docker image / container image, when named
    runtime: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The function invokes other functions through the platform's own API
    # (fl_invoker); only such functions get the platform's credentials.
    platform_api: bool = False


@dataclass(frozen=True)
class Artifact:
    """A reproducible source zip; `sha256` is its content hash."""

    data: bytes
    sha256: str
    entry: str                # which thin entry it carries ("openwhisk" or "http")
    runtime: str | None = None  # the runtime the function declares (fedkeeper/runtimes)


@dataclass
class UploadPlan:
    """What a deploy would send where, found without the network
    (`fedkeeper deploy --dry-run`) and checked against the platform's limit."""

    cluster: str
    function: str
    platform: str
    target: str               # where it goes (URL, resource name, namespace)
    what: str                 # the form it takes there (kind, image, ConfigMap...)
    bytes: int                # the size the limit applies to
    limit_bytes: int | None = None
    limit_source: str = ""    # where the limit comes from
    runtime: str | None = None
    image: str | None = None

    @property
    def within_limit(self) -> bool:
        return self.limit_bytes is None or self.bytes <= self.limit_bytes


@dataclass
class DeployResult:
    name: str
    skipped: bool             # content hash unchanged: nothing was uploaded
    seconds: float
    url: str | None = None


@dataclass
class Invocation:
    """A submitted, not yet finished invocation."""

    function: str
    platform_id: str          # activation id / execution id
    submitted_at: float       # epoch seconds, keeper clock
    payload_bytes: int = 0


@dataclass
class Outcome:
    """A finished invocation, as the platform recorded it."""

    platform_id: str
    ok: bool
    error_class: ErrorClass | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    start: float | None = None        # epoch seconds
    end: float | None = None
    duration_ms: float | None = None
    wait_ms: float | None = None
    init_ms: float | None = None
    cold_start: bool | None = None
    result_bytes: int = 0
    retry_after: float | None = None  # seconds, when the platform asked for a pause


@dataclass(frozen=True)
class Prices:
    """What a platform charges per invocation, for cost estimates
    (docs/cost.md). A cluster's `pricing` block overrides single fields."""

    per_gb_second: float = 0.0            # memory: per GB (1024 MB) held for one second
    per_ghz_second: float = 0.0           # CPU: per GHz of clock for one second
    per_million_invocations: float = 0.0
    billing_increment_ms: int = 1         # billed time is rounded up to a multiple of this
    currency: str = "USD"
    #: (memory MB, CPU GHz) tiers, ascending: a function gets the clock of the
    #: smallest tier with at least its memory (the largest beyond the table)
    cpu_tiers: tuple[tuple[int, float], ...] = ()
    #: where the figures come from (price sheet and date)
    source: str = ""

    def cpu_ghz(self, memory_mb: float) -> float:
        for tier_mb, ghz in self.cpu_tiers:
            if memory_mb <= tier_mb:
                return ghz
        return self.cpu_tiers[-1][1] if self.cpu_tiers else 0.0

    def overridden(self, pricing: Any) -> "Prices":
        """These prices with every field `pricing` (a PricingConfig) sets."""
        if pricing is None:
            return self
        changes = {k: getattr(pricing, k) for k in ("per_gb_second", "per_ghz_second",
                                                   "per_million_invocations", "billing_increment_ms")
                   if getattr(pricing, k, None) is not None}
        changes["currency"] = getattr(pricing, "currency", None) or self.currency
        return replace(self, source=f"{self.source} (with the cluster's pricing overrides)".strip(),
                       **changes)


@dataclass
class ProviderContext:
    """What a provider may need from the keeper's environment."""

    state_dir: Path           # local processes keep pid/port files and data here
    store_url: str | None = None
    # Leave local services (fabric, functions-framework hosts) running when
    # the provider closes, e.g. after `fedkeeper deploy` or --keep-services.
    keep_local_services: bool = False
    # Every cluster of the command's config (name -> (provider section,
    # cluster config)): local clusters of one state directory share their
    # services, and so the settings of those.
    clusters: dict[str, tuple[str, Any]] = field(default_factory=dict)


#: see poll_delay
POLL_LATE_FRACTION = 0.1
POLL_MAX_S = 1.0


def poll_delay(elapsed_s: float, poll_s: float) -> float:
    """How long `Provider.call` sleeps before it looks again, `elapsed_s`
    into the call: a tenth of the time waited so far, at least `poll_s` and
    at most a second. An outcome is seen at most max(10%, `poll_s`) after it
    lands, and never more than a second late: about 40 looks in the first
    10 s, then one a second. Every round waits for its aggregation through
    this: a delay growing by half at each look saw a 2.0 s aggregation at
    2.5 s, and one of 0.28 s at 0.41 s."""
    return min(POLL_MAX_S, max(poll_s, POLL_LATE_FRACTION * elapsed_s))


class Provider(ABC):
    """One cluster of one platform."""

    #: platform name recorded with every invocation (e.g. "openwhisk")
    platform: ClassVar[str]
    #: which thin entry the artifacts for this platform carry
    entry: ClassVar[str]
    #: can track invocations started by someone else (e.g. fl_invoker) from
    #: their platform ids alone; HTTP platforms cannot, the answer belongs to
    #: the connection that made the call
    tracks_foreign_invocations: ClassVar[bool] = False
    #: list prices of the platform, for cost estimates (docs/cost.md); a
    #: platform without a price sheet costs nothing unless a cluster sets `pricing`
    default_prices: ClassVar[Prices] = Prices(source="no price sheet: counted as free")

    def __init__(self, cluster_name: str, cluster: Any, ctx: "ProviderContext"):
        self.cluster_name = cluster_name
        self.cluster = cluster
        self.ctx = ctx

    @abstractmethod
    def deploy(self, spec: FunctionSpec, artifact: Artifact) -> DeployResult:
        """Create or update; skipped when the deployed content hash matches."""

    @abstractmethod
    def remove(self, name: str) -> bool:
        """Delete; False when it did not exist."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def invoke(self, name: str, payload: dict[str, Any]) -> Invocation:
        """Submit without waiting. Raises ProviderError (classified)."""

    @abstractmethod
    def track(self, pending: Sequence[Invocation]) -> list[Outcome]:
        """Outcomes of those pending invocations that have finished.

        Must be efficient for many pending invocations: batch listing, not
        one request per invocation.
        """

    def _require_entry(self, artifact: Artifact) -> None:
        if artifact.entry != self.entry:
            raise ProviderError(ErrorClass.PLATFORM_ERROR,
                                f"artifact carries the {artifact.entry!r} entry; {self.platform} "
                                f"needs {self.entry!r}")

    def limits(self) -> dict[str, Any]:
        """Platform limits that matter to a round (e.g. concurrentInvocations)."""
        return {}

    @classmethod
    def plan_upload(cls, cluster_name: str, cluster: Any, spec: FunctionSpec,
                    artifact: Artifact) -> UploadPlan:
        """What `deploy` would upload where, with its size and the limit it
        must fit. A class method: no provider is made, so no network call and
        no local service is started. Platforms with a limit override it."""
        return UploadPlan(cluster=cluster_name, function=spec.name, platform=cls.platform,
                          target=cluster_name, what=f"{artifact.entry} source zip",
                          bytes=len(artifact.data), runtime=artifact.runtime, image=spec.image)

    #: why `cluster_metrics` has no figures for this platform
    no_metrics_note: ClassVar[str] = "this platform has no Prometheus source"

    @classmethod
    def cluster_metrics(cls, cluster_name: str, cluster: Any, window: str | None,
                        actions: Iterable[str] | None, timeout_s: float = 10.0) -> ClusterMetrics:
        """The platform's metrics adapter: what the cluster's Prometheus saw
        of `actions` over `window` (docs/metrics.md). A class method, so no
        provider (and no local service) is made for it. Platforms without a
        Prometheus source answer with a note, which is not an error."""
        return ClusterMetrics(cluster=cluster_name, prometheus=None, namespace=None, window=window,
                              note=cls.no_metrics_note)

    def capacity_warning(self, concurrent: int) -> str | None:
        """A warning when `concurrent` simultaneous invocations would exceed
        a platform limit (e.g. OpenWhisk's concurrentInvocations), else None."""
        return None

    def restart_local_service(self) -> bool:
        """Restart the local service this provider owns (an embedded fabric,
        say) after it stopped answering. False when it owns none, as every
        remote platform: the keeper then waits, bounded, and stops."""
        return False

    def lost_invocations(self, pending: Sequence[Invocation]) -> list[str]:
        """Platform ids of `pending` that this platform cannot know (a local
        service restarted since they were submitted), to be invoked again at
        once rather than waited out. [] when it cannot tell."""
        return []

    def close(self) -> None:
        """Release connections and local processes owned by this provider."""

    def call(self, name: str, payload: dict[str, Any], timeout_s: float,
             poll_s: float = 0.05) -> Outcome:
        """Invoke and wait for the outcome (used for init and aggregation)."""
        return self.wait(self.invoke(name, payload), timeout_s, poll_s)

    def wait(self, inv: Invocation, timeout_s: float, poll_s: float = 0.05) -> Outcome:
        """Track one invocation until its outcome, or a timeout outcome
        after `timeout_s` (polling as poll_delay says)."""
        started = time.monotonic()
        deadline = started + timeout_s
        while True:
            done = self.track([inv])
            if done:
                return done[0]
            now = time.monotonic()
            if now >= deadline:   # looked once more at the deadline itself
                break
            time.sleep(min(poll_delay(now - started, poll_s), deadline - now))
        return self.timed_out(inv, timeout_s)

    @staticmethod
    def timed_out(inv: Invocation, timeout_s: float) -> Outcome:
        return Outcome(platform_id=inv.platform_id, ok=False, error_class=ErrorClass.TIMEOUT,
                       error=f"no outcome within {timeout_s:.0f}s")
