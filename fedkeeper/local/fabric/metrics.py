"""GET /metrics: per-activation metrics under the names and labels of
OpenWhisk's user-events service (see docs/metrics.md)."""
from __future__ import annotations

import bisect
import threading

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .status import APPLICATION_ERROR, DEVELOPER_ERROR, SUCCESS, WHISK_ERROR


# What OpenWhisk's user-events service (core/monitoring/user-events,
# PrometheusRecorder) exports for every activation event, with the same
# metric names, label names, label values and buckets, so that dashboards and
# queries written against an OpenWhisk deployment work on the fabric as is.
_INF = float("inf")
# The Java client's default histogram buckets, which OpenWhisk does not override.
_OW_TIME_BUCKETS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0, _INF)
# Response sizes: linear buckets from 0, one activation entity limit (1 MB) wide, ten of them.
_OW_SIZE_BUCKETS = tuple(float(i * 1048576) for i in range(10)) + (_INF,)
# OpenWhisk's ActivationResponse status names as the events carry them (not the API's strings).
_OW_STATUS = {SUCCESS: "success", APPLICATION_ERROR: "application_error",
              DEVELOPER_ERROR: "action_developer_error", WHISK_ERROR: "whisk_internal_error"}
_OW_LABELS = ("namespace", "initiator", "action")
# OpenWhisk's Java client (simpleclient 0.6) writes these two counters under
# their bare names; Prometheus's Python client appends `_total` to every
# counter it writes. They are collected untyped (so that the name stays) and
# their TYPE line is set back to counter in the exposition.
_BARE_COUNTERS = ("openwhisk_action_status", "openwhisk_action_status_code")
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Histo:
    __slots__ = ("counts", "sum")

    def __init__(self, n: int):
        self.counts = [0] * n      # per bucket, not cumulative
        self.sum = 0.0

    def observe(self, bounds: tuple, value: float) -> None:
        # Bucket `le` counts values <= its bound: the first bound >= value.
        self.counts[bisect.bisect_left(bounds, value)] += 1
        self.sum += value


class _ActionEvents:
    """The series of one (namespace, initiator, action). As in OpenWhisk, all
    of them exist (at zero) from the action's first activation on."""
    __slots__ = ("activations", "cold", "wait", "init", "duration", "size", "status",
                 "status_code", "memory")

    def __init__(self):
        self.activations: dict[tuple[str, str], int] = {}   # (kind, memory) -> count
        self.cold = 0
        self.wait = _Histo(len(_OW_TIME_BUCKETS))
        self.init = _Histo(len(_OW_TIME_BUCKETS))
        self.duration = _Histo(len(_OW_TIME_BUCKETS))
        self.size = _Histo(len(_OW_SIZE_BUCKETS))
        self.status = {s: 0 for s in _OW_STATUS.values()}
        self.status_code: dict[str, int] = {}
        self.memory = 0.0


class UserEvents:
    """Per-activation metrics in OpenWhisk's user-events form, collected by a
    registry of the fabric's own. `activation` runs on the fabric's hot path
    (under its lock): plain counters and a bisect, nothing more."""

    def __init__(self):
        self._lock = threading.Lock()
        self._actions: dict[tuple[str, str, str], _ActionEvents] = {}
        self._limits: dict[str, list[int]] = {}     # initiator -> [concurrent, timed]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def activation(self, namespace: str, initiator: str, action: str, kind: str, memory_mb: int,
                   code: int, duration_ms: int, wait_ms: int, init_ms: int | None, size: int | None,
                   user_code: int | None) -> None:
        with self._lock:
            key = (namespace, initiator, action)
            e = self._actions.get(key)
            if e is None:
                e = self._actions[key] = _ActionEvents()
            e.memory = float(memory_mb)
            ak = (kind, str(memory_mb))
            e.activations[ak] = e.activations.get(ak, 0) + 1
            # None for a warm start: the record has no initTime annotation.
            if init_ms is not None:
                e.cold += 1
                e.init.observe(_OW_TIME_BUCKETS, init_ms / 1000.0)
            e.wait.observe(_OW_TIME_BUCKETS, wait_ms / 1000.0)
            e.duration.observe(_OW_TIME_BUCKETS, duration_ms / 1000.0)
            status = _OW_STATUS.get(code, str(code))
            e.status[status] = e.status.get(status, 0) + 1
            if size is not None:
                e.size.observe(_OW_SIZE_BUCKETS, float(size))
            if user_code is not None:
                sc = str(user_code)
                e.status_code[sc] = e.status_code.get(sc, 0) + 1

    def limit(self, initiator: str, concurrent: bool) -> None:
        """A 429: OpenWhisk's ConcurrentRateLimit or TimedRateLimit event."""
        with self._lock:
            c = self._limits.setdefault(initiator, [0, 0])
            c[0 if concurrent else 1] += 1

    # The registry's collector interface.
    def collect(self):
        with self._lock:
            actions = sorted(self._actions.items())
            snap = [(k, dict(e.activations), e.cold,
                     *(_histo_copy(h) for h in (e.wait, e.init, e.duration, e.size)),
                     dict(e.status), dict(e.status_code), e.memory) for k, e in actions]
            limits = sorted((k, list(v)) for k, v in self._limits.items())
        labels = list(_OW_LABELS)
        act = CounterMetricFamily("openwhisk_action_activations_total", "Activation Count",
                                  labels=labels + ["kind", "memory"])
        cold = CounterMetricFamily("openwhisk_action_coldStarts_total", "Cold start counts", labels=labels)
        status = Metric("openwhisk_action_status", "Activation failure status type", "unknown")
        scode = Metric("openwhisk_action_status_code",
                       "status code returned in action result response set by developer", "unknown")
        hists = [
            ("openwhisk_action_waitTime_seconds", "Internal system hold time", _OW_TIME_BUCKETS),
            ("openwhisk_action_initTime_seconds", "Time it took to initialize an action, e.g. docker init",
             _OW_TIME_BUCKETS),
            ("openwhisk_action_duration_seconds", "Actual time the action code was running",
             _OW_TIME_BUCKETS),
            ("openwhisk_action_response_size_bytes", "Activation Response size", _OW_SIZE_BUCKETS),
        ]
        hfams = [Metric(name, doc, "histogram") for name, doc, _ in hists]
        mem = GaugeMetricFamily("openwhisk_action_memory", "Memory consumption of the action containers",
                                labels=labels)
        for key, activations, n_cold, wait, init, duration, size, st, sc, memory in snap:
            lv = dict(zip(_OW_LABELS, key))
            for (kind, memory_label), n in sorted(activations.items()):
                act.add_metric([*key, kind, memory_label], n)
            cold.add_metric(list(key), n_cold)
            for s, n in st.items():
                status.add_sample("openwhisk_action_status", {**lv, "status": s}, n)
            for code, n in sorted(sc.items()):
                scode.add_sample("openwhisk_action_status_code", {**lv, "status_code": code}, n)
            for fam, (name, _, bounds), (counts, total) in zip(hfams, hists, (wait, init, duration, size)):
                acc = 0
                for bound, n in zip(bounds, counts):
                    acc += n
                    fam.add_sample(name + "_bucket", {**lv, "le": _le(bound)}, acc)
                fam.add_sample(name + "_count", lv, acc)
                fam.add_sample(name + "_sum", lv, total)
            mem.add_metric(list(key), memory)
        conc = CounterMetricFamily("openwhisk_action_limit_concurrent_total",
                                   "a user has exceeded its limit for concurrent invocations",
                                   labels=["namespace"])
        timed = CounterMetricFamily("openwhisk_action_limit_timed_total",
                                    "the user has reached its per minute limit for the number of invocations",
                                    labels=["namespace"])
        for initiator, (n_conc, n_timed) in limits:
            conc.add_metric([initiator], n_conc)
            timed.add_metric([initiator], n_timed)
        return [act, cold, status, scode, *hfams, mem, conc, timed]

    def exposition(self) -> bytes:
        text = generate_latest(self.registry)
        for name in _BARE_COUNTERS:
            text = text.replace(f"# TYPE {name} untyped\n".encode(), f"# TYPE {name} counter\n".encode(), 1)
        return text


def _histo_copy(h: _Histo) -> tuple[list[int], float]:
    return list(h.counts), h.sum


def _le(bound: float) -> str:
    # As the Java client writes bucket bounds: "+Inf", "0.005", "1.0", "1048576.0".
    return "+Inf" if bound == _INF else repr(float(bound))
