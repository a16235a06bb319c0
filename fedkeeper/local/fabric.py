"""The embedded local OpenWhisk fabric.

One process that speaks the subset of OpenWhisk's REST API FedKeeper uses,
with OpenWhisk's shapes, status codes and messages, and runs actions in warm
worker processes. The `openwhisk` provider talks to it exactly as it talks to
a real controller; Apache's own JavaScript client is run against it in the
conformance test.

Routes (all under basic auth `uuid:key`; `{ns}` is `_` or a namespace name):
  GET    /api/v1/namespaces                         list of namespaces
  GET    /api/v1/namespaces/{ns}/actions            list actions (?limit, ?skip)
  PUT    /api/v1/namespaces/{ns}/actions/{name}     create; 409 if it exists without ?overwrite=true
  GET    /api/v1/namespaces/{ns}/actions/{name}     404 when missing; ?code=false leaves the code out
  DELETE /api/v1/namespaces/{ns}/actions/{name}
  POST   /api/v1/namespaces/{ns}/actions/{name}     invoke: ?blocking, ?result, ?timeout (ms)
  GET    /api/v1/namespaces/{ns}/activations        ?name ?since ?upto ?limit(<=200) ?skip ?docs ?count
  GET    /api/v1/namespaces/{ns}/activations/{id}   404 until the activation has finished
  GET    /api/v1/namespaces/{ns}/activations/{id}/result | /logs
  GET    /api/v1/namespaces/{ns}/limits
Administration of the fabric itself (not part of OpenWhisk's API):
  GET|PUT /_fabric/faults?namespace=NS   fault injection: crash, timeout, throttle, slow_ms, seed, functions
  GET|PUT /_fabric/limits?namespace=NS   concurrentInvocations, invocationsPerMinute, payloadLimit, ...
  GET     /_fabric/status                workers, queues, counters
  GET     /metrics                       Prometheus metrics, without auth, under the names and
                                         labels of OpenWhisk's user-events service (see
                                         UserEvents below and docs/metrics.md)

Execution model (what a real invoker does, in processes instead of containers):
  * An action's code is a python zip (`exec.binary`) with `__main__.py`
    defining `main(args)` (or plain python source). It is unpacked once per
    action version; a worker process (worker.py, same interpreter) loads it
    and then serves many activations: a warm start. A new worker is a cold
    start; its code load is the activation's `initTime`, the process start
    is part of its `waitTime`, as container creation is in OpenWhisk.
  * Per action, a pool of workers, each taking up to `limits.concurrency`
    activations at once. Workers are admitted against the fabric's user
    memory (`--user-memory-mb`, the sum of the actions' `limits.memory`, as
    an invoker's userMemory); when it is full an idle worker of another
    action is evicted, else activations queue (and wait: `waitTime`). The
    default user memory is half the machine's memory, clamped to 2-16 GB.
  * `limits.timeout` is enforced by killing the worker; the activation gets
    OpenWhisk's "The action exceeded its time limits of N milliseconds." and
    the `timeout` annotation. `limits.memory` is enforced by watching the
    worker's resident set size (RSS) every 250 ms and killing it when it is
    exceeded ("The action exhausted its memory and was aborted."). An address
    space limit (RLIMIT_AS) is not used: TensorFlow reserves far more virtual
    memory than it ever touches, so RSS is the honest measure.
  * Idle workers are reaped after `--idle-s` seconds (OpenWhisk keeps idle
    containers about ten minutes); redeploying an action retires its old
    workers (idle ones at once, busy ones when they finish).
  * Actions (metadata and code) are kept under the state directory and
    survive a restart of the fabric; activation records live in memory (the
    newest `--max-records`), as the fabric is a stand-in for one machine.
Fault injection is decided per invocation from a hash of (seed, namespace,
action, sequence number), so a seed gives the same faults for the same
sequence of invocations however they interleave in time:
  crash     the worker process dies under the activation (before main runs):
            "action developer error", and the next activation is a cold start
  timeout   simulated: the activation is not run and is recorded at once as a
            time-limit overrun (the timeout record), without waiting the
            whole timeout; it carries the annotation fk-fault=timeout
  throttle  the invoke request is answered 429
  slow_ms   added to every matching activation's run time
"""
from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import contextlib
import fcntl
import hashlib
import hmac
import http.client
import io
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..procs import pid_alive
# The worker runs as a plain script (stdlib only); its framing helper is shared.
from .worker import _recv_exact

log = logging.getLogger("fedkeeper.fabric")

STATE_FILE = "fabric.json"
AUTH_FILE = "auth"
LOG_FILE = "fabric.log"
DEFAULT_NAMESPACE = "guest"
WORKER_SCRIPT = str(Path(__file__).with_name("worker.py"))
_HDR = struct.Struct(">I")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_@.\- ]{0,255}$")

# OpenWhisk's activation status codes and the strings its API reports.
SUCCESS, APPLICATION_ERROR, DEVELOPER_ERROR, WHISK_ERROR = 0, 1, 2, 3
STATUS = {SUCCESS: "success", APPLICATION_ERROR: "application error",
          DEVELOPER_ERROR: "action developer error", WHISK_ERROR: "whisk internal error"}

# OpenWhisk's own messages (org.apache.openwhisk.http.Messages).
MSG_ABNORMAL_RUN = "The action did not produce a valid response and exited unexpectedly."
MSG_MEMORY = "The action exhausted its memory and was aborted."
MSG_NOT_FOUND = "The requested resource does not exist."
MSG_EXISTS = "resource already exists"
MSG_BAD_AUTH = "The supplied authentication is invalid."
MSG_PARAMS_NOT_ALLOWED = "Request defines parameters that are not allowed (e.g., reserved properties)."
MSG_REMOVED = "Action could not be found or may have been deleted."


def msg_timeout(ms: int) -> str:
    return f"The action exceeded its time limits of {ms} milliseconds."


def msg_too_many_per_minute(count: int, allowed: int) -> str:
    return f"Too many requests in the last minute (count: {count}, allowed: {allowed})."


def msg_too_many_concurrent(count: int, allowed: int) -> str:
    return f"Too many concurrent requests in flight (count: {count}, allowed: {allowed})."


def msg_init_failed(detail: str) -> str:
    return f"The action failed during initialization: {detail}"


class FabricError(RuntimeError):
    """The fabric could not be started, reached or stopped."""


def default_user_memory_mb() -> int:
    """Half the machine's memory, between 2 and 16 GB: room for the warm
    workers of a whole FL scenario (1-2 GB each by default) without evicting
    the server functions between rounds."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        total = 8192
    return int(min(16384, max(2048, total // 2)))


@dataclass
class Settings:
    payload_limit: int = 1048576           # bytes of an invoke request body (OpenWhisk: 1 MB)
    code_limit: int = 64 * 1024 * 1024     # bytes of an action PUT body (zip in base64)
    concurrent_invocations: int = 1000     # per namespace, queued or running
    invocations_per_minute: int = 60000    # per namespace, rolling minute
    blocking_wait_s: float = 60.0          # OpenWhisk's maximum blocking wait
    idle_s: float = 600.0                  # idle worker lifetime
    user_memory_mb: int = field(default_factory=default_user_memory_mb)  # sum of limits.memory of workers
    max_records: int = 100000              # activation records kept in memory
    memory_check_s: float = 0.25


@dataclass
class Faults:
    crash: float = 0.0
    timeout: float = 0.0
    throttle: float = 0.0
    slow_ms: int = 0
    seed: int = 0
    functions: list[str] | None = None

    @classmethod
    def parse(cls, body: Any) -> "Faults":
        if not isinstance(body, dict):
            raise ValueError("faults must be a JSON object")
        unknown = set(body) - {"crash", "timeout", "throttle", "slow_ms", "seed", "functions"}
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        f = cls(**{k: v for k, v in body.items() if v is not None})
        for k in ("crash", "timeout", "throttle"):
            v = getattr(f, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{k} must be a probability between 0 and 1")
        if f.crash + f.timeout + f.throttle > 1:
            raise ValueError("crash + timeout + throttle add up to more than 1")
        if isinstance(f.slow_ms, bool) or not isinstance(f.slow_ms, int) or f.slow_ms < 0:
            raise ValueError("slow_ms must be a non-negative integer")
        if isinstance(f.seed, bool) or not isinstance(f.seed, int):
            raise ValueError("seed must be an integer")
        if f.functions is not None and not (isinstance(f.functions, list)
                                            and all(isinstance(x, str) for x in f.functions)):
            raise ValueError("functions must be a list of action names or null")
        return f

    def to_json(self) -> dict:
        return {"crash": self.crash, "timeout": self.timeout, "throttle": self.throttle,
                "slow_ms": self.slow_ms, "seed": self.seed, "functions": self.functions}

    def applies_to(self, name: str) -> bool:
        return self.functions is None or name in self.functions

    def draw(self, ns: str, name: str, n: int) -> str | None:
        """The fault of the n-th invocation of ns/name, a pure function of the seed."""
        if not self.applies_to(name) or not (self.crash or self.timeout or self.throttle):
            return None
        digest = hashlib.sha256(f"{self.seed}\0{ns}\0{name}\0{n}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
        if u < self.crash:
            return "crash"
        if u < self.crash + self.timeout:
            return "timeout"
        if u < self.crash + self.timeout + self.throttle:
            return "throttle"
        return None


# --------------------------------------------------------------------------- entities

class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _annotation(annotations: list, key: str, default: Any = None) -> Any:
    for a in annotations or ():
        if isinstance(a, dict) and a.get("key") == key:
            return a.get("value")
    return default


def _kv_list(value: Any, what: str) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, dict) and isinstance(x.get("key"), str)
                                              for x in value):
        raise ApiError(400, f"{what} must be a list of {{\"key\": ..., \"value\": ...}} objects.")
    return [{"key": x["key"], "value": x.get("value")} for x in value]


@dataclass
class Action:
    namespace: str
    name: str
    version: int
    exec: dict
    parameters: list
    annotations: list
    limits: dict
    publish: bool
    updated: int
    code_dir: str | None = None       # unpacked code; None when there is none to run
    run_error: str | None = None      # why it cannot run, when it cannot

    @property
    def semver(self) -> str:
        return f"0.0.{self.version}"

    @property
    def timeout_ms(self) -> int:
        return int(self.limits["timeout"])

    def to_json(self, code: bool = True) -> dict:
        ex = dict(self.exec)
        if not code:
            ex.pop("code", None)
        return {"namespace": self.namespace, "name": self.name, "version": self.semver,
                "exec": ex, "parameters": self.parameters, "annotations": self.annotations,
                "limits": self.limits, "publish": self.publish, "updated": self.updated}


class Activation:
    __slots__ = ("id", "ns", "action", "args", "received", "start", "end", "cold", "init_ms",
                 "worker", "fault", "slow_ms", "deadline", "done", "record", "status", "seq")

    def __init__(self, aid: str, ns: "Namespace", action: Action, args: dict, fault: str | None,
                 slow_ms: int):
        self.id = aid
        self.ns = ns
        self.action = action
        self.args = args
        self.received = time.time()
        self.start: float | None = None
        self.end: float | None = None
        self.cold = False
        self.init_ms: float | None = None
        self.worker: Worker | None = None
        self.fault = fault
        self.slow_ms = slow_ms
        self.deadline: float | None = None
        self.done = threading.Event()
        self.record: bytes | None = None
        self.status: int | None = None
        self.seq = 0


class Worker:
    _ids = itertools.count(1)

    def __init__(self, action: Action):
        self.id = next(Worker._ids)
        self.key = (action.namespace, action.name)
        self.version = action.version
        self.action = action
        self.capacity = max(1, int(action.limits.get("concurrency", 1)))
        self.memory_mb = int(action.limits["memory"])
        self.state = "starting"          # starting -> ready -> dead
        self.assigned: dict[str, Activation] = {}
        self.pending: list[Activation] = []   # assigned before the worker was ready
        self.spawned = time.time()
        self.last_used = self.spawned
        self.init_ms: float | None = None
        self.init_error: str | None = None
        self.kill_reason: str | None = None
        self.retired = False
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.send_lock = threading.Lock()
        self.psutil_proc = None
        self.runs = 0

    @property
    def free(self) -> int:
        return self.capacity - len(self.assigned)

    def send(self, msg: dict) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode()
        with self.send_lock:
            if self.sock is None:
                raise OSError("worker has no socket")
            self.sock.sendall(_HDR.pack(len(data)) + data)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def describe(self) -> dict:
        return {"id": self.id, "namespace": self.key[0], "action": self.key[1],
                "version": f"0.0.{self.version}", "pid": self.proc.pid if self.proc else None,
                "state": self.state, "assigned": len(self.assigned), "capacity": self.capacity,
                "memory_mb": self.memory_mb, "runs": self.runs, "retired": self.retired,
                "idle_s": round(time.time() - self.last_used, 3) if not self.assigned else 0.0}


class Namespace:
    def __init__(self, name: str, settings: Settings):
        self.name = name
        self.actions: dict[str, Action] = {}
        self.concurrent_invocations = settings.concurrent_invocations
        self.invocations_per_minute = settings.invocations_per_minute
        self.faults: Faults | None = None
        self.fault_counters: dict[str, int] = {}
        self.minute: deque[float] = deque()
        self.inflight = 0
        # Finished activations: id -> (start_ms, name, doc bytes, summary bytes)
        self.records: dict[str, tuple[int, str, bytes, bytes]] = {}
        # Sorted by (start_ms, seq): the whole namespace and per action name.
        self.index: list[tuple[int, int, str]] = []
        self.by_name: dict[str, list[tuple[int, int, str]]] = {}
        self.seq = itertools.count()
        self.counts = {"invocations": 0, "cold_starts": 0, "throttled": 0}


# --------------------------------------------------------------------------- /metrics

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


def _user_status_code(result: Any) -> int | None:
    """The status code an action put in its result (error.statusCode, else
    statusCode), as OpenWhisk reads it for openwhisk_action_status_code:
    numbers are truncated to integers, anything else counts as 400."""
    if not isinstance(result, dict):
        return None
    err = result.get("error")
    if isinstance(err, dict) and "statusCode" in err:
        v = err["statusCode"]
    elif "statusCode" in result:
        v = result["statusCode"]
    else:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (_INF, -_INF):
        return 400
    return int(v)


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


# --------------------------------------------------------------------------- the fabric

class Fabric:
    def __init__(self, state_dir: Path, settings: Settings, auth: str, api_host: str = ""):
        self.state_dir = Path(state_dir)
        self.settings = settings
        self.auth = auth
        self.api_host = api_host
        self.lock = threading.RLock()
        self.namespaces: dict[str, Namespace] = {}
        self.pools: dict[tuple[str, str], list[Worker]] = {}
        self.queues: dict[tuple[str, str], deque[Activation]] = {}
        self.workers: set[Worker] = set()
        self.memory_used = 0
        self.stopping = False
        self.events = UserEvents()
        self.actions_dir = self.state_dir / "actions"
        self.logs_dir = self.state_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._housekeeper = threading.Thread(target=self._housekeeping, name="fabric-housekeeper",
                                             daemon=True)
        self._load_actions()
        self._housekeeper.start()

    # ------------------------------------------------------------------ namespaces
    def ns(self, name: str) -> Namespace:
        if name == "_":
            name = DEFAULT_NAMESPACE
        if not _NAME_RE.match(name):
            raise ApiError(400, "The namespace contains illegal characters.")
        n = self.namespaces.get(name)
        if n is None:
            with self.lock:
                n = self.namespaces.setdefault(name, Namespace(name, self.settings))
        return n

    # ------------------------------------------------------------------ actions
    def put_action(self, ns_name: str, name: str, body: Any, overwrite: bool) -> dict:
        if not _NAME_RE.match(name) or "/" in name:
            raise ApiError(400, "The name of the entity contains illegal characters.")
        if not isinstance(body, dict):
            raise ApiError(400, "The request content was malformed: expected a JSON object.")
        ns = self.ns(ns_name)
        with self.lock:
            old = ns.actions.get(name)
            if old is not None and not overwrite:
                raise ApiError(409, MSG_EXISTS)
        if old is None and "exec" not in body:
            raise ApiError(400, "The request content was malformed: exec undefined.")
        ex = body.get("exec", old.exec if old else None)
        limits = dict(old.limits) if old else {"timeout": 60000, "memory": 256, "logs": 10,
                                                "concurrency": 1}
        if body.get("limits") is not None:
            if not isinstance(body["limits"], dict):
                raise ApiError(400, "limits must be an object.")
            limits.update({k: v for k, v in body["limits"].items() if v is not None})
        self._check_limits(limits)
        exec_norm, code_bytes, source, run_error = self._check_exec(ex)
        version = (old.version + 1) if old else 1
        action = Action(namespace=ns.name, name=name, version=version, exec=exec_norm,
                        parameters=_kv_list(body.get("parameters", old.parameters if old else []),
                                            "parameters"),
                        annotations=_kv_list(body.get("annotations", old.annotations if old else []),
                                             "annotations"),
                        limits=limits, publish=bool(body.get("publish", False)),
                        updated=int(time.time() * 1000), run_error=run_error)
        if code_bytes is not None or source is not None:
            action.code_dir = self._unpack(action, code_bytes, source)
        self._persist(action)
        with self.lock:
            ns.actions[name] = action
            ops = self._retire(ns.name, name, keep_version=version)
        self._run_ops(ops)
        return action.to_json(code=True)

    def _check_limits(self, limits: dict) -> None:
        def intval(key: str, lo: int, hi: int) -> None:
            v = limits.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
                raise ApiError(400, f"limits.{key} must be an integer.")
            if not lo <= v <= hi:
                raise ApiError(400, f"limits.{key} {int(v)} is outside the allowed range {lo} to {hi}.")
            limits[key] = int(v)
        intval("timeout", 100, 3600000)
        intval("memory", 128, self.settings.user_memory_mb)
        intval("concurrency", 1, 500)
        intval("logs", 0, 10)

    def _check_exec(self, ex: Any) -> tuple[dict, bytes | None, str | None, str | None]:
        if not isinstance(ex, dict) or not isinstance(ex.get("kind"), str):
            raise ApiError(400, "The request content was malformed: exec.kind undefined.")
        kind = ex["kind"]
        code = ex.get("code")
        binary = ex.get("binary")
        if binary is None:
            # As OpenWhisk does when `binary` is absent: base64 of a zip
            # archive starts with the encoding of "PK\x03\x04".
            binary = isinstance(code, str) and code.lstrip().startswith("UEsDB")
        binary = bool(binary)
        out = {"kind": kind, "binary": binary}
        if ex.get("main"):
            out["main"] = str(ex["main"])
        if kind == "blackbox":
            if not isinstance(ex.get("image"), str) or not ex["image"]:
                raise ApiError(400, "The request content was malformed: a blackbox action needs exec.image.")
            out["image"] = ex["image"]
        elif not (kind == "python" or kind.startswith("python:")):
            raise ApiError(400, f"The local fabric runs python actions ('python:3', 'python:3.11', ...) "
                                f"and blackbox actions carrying python code; kind '{kind}' is not supported.")
        if code is None:
            if kind != "blackbox":
                raise ApiError(400, "The request content was malformed: exec.code undefined.")
            return out, None, None, (f"The local fabric cannot run the docker image {out['image']!r}; "
                                     "deploy the action with its python zip as exec.code.")
        if not isinstance(code, str):
            raise ApiError(400, "The request content was malformed: exec.code must be a string.")
        out["code"] = code
        if binary:
            try:
                data = base64.b64decode(code, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "exec.code is not valid base64.") from None
            return out, data, None, None
        return out, None, code, None

    def _unpack(self, action: Action, data: bytes | None, source: str | None) -> str:
        digest = hashlib.sha256(data if data is not None else source.encode()).hexdigest()[:16]
        dest = self.actions_dir / action.namespace / action.name / f"{action.version}-{digest}"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        if source is not None:
            (dest / "__main__.py").write_text(source)
            return str(dest)
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                root = dest.resolve()
                for info in zf.infolist():
                    target = (dest / info.filename).resolve()
                    if root not in target.parents and target != root:
                        raise ApiError(400, f"The action's zip has an unsafe member path: {info.filename!r}")
                zf.extractall(dest)
        except zipfile.BadZipFile as exc:
            shutil.rmtree(dest, ignore_errors=True)
            raise ApiError(400, f"exec.code is not a valid zip archive: {exc}") from None
        if not (dest / "__main__.py").is_file():
            shutil.rmtree(dest, ignore_errors=True)
            raise ApiError(400, "The action's zip has no __main__.py at its top level.")
        return str(dest)

    def _persist(self, action: Action) -> None:
        d = self.actions_dir / action.namespace / action.name
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "action.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({**action.to_json(code=True), "version": action.version,
                       "code_dir": action.code_dir, "run_error": action.run_error}, f)
        os.replace(tmp, d / "action.json")
        # Code of versions no worker can use any more.
        with self.lock:
            in_use = {w.action.code_dir for w in self.workers}
        for old in d.iterdir():
            if old.is_dir() and str(old) not in in_use and str(old) != action.code_dir:
                shutil.rmtree(old, ignore_errors=True)

    def _load_actions(self) -> None:
        if not self.actions_dir.is_dir():
            return
        for meta in self.actions_dir.glob("*/*/action.json"):
            try:
                j = json.loads(meta.read_text())
                a = Action(namespace=j["namespace"], name=j["name"], version=int(j["version"]),
                           exec=j["exec"], parameters=j["parameters"], annotations=j["annotations"],
                           limits=j["limits"], publish=j["publish"], updated=j["updated"],
                           code_dir=j.get("code_dir"), run_error=j.get("run_error"))
                if a.code_dir and not Path(a.code_dir).is_dir():
                    continue
                self.ns(a.namespace).actions[a.name] = a
            except (OSError, ValueError, KeyError, TypeError, ApiError) as exc:
                log.warning("skipping stored action %s: %s", meta.parent.name, exc)

    def get_action(self, ns_name: str, name: str) -> Action:
        a = self.ns(ns_name).actions.get(name)
        if a is None:
            raise ApiError(404, MSG_NOT_FOUND)
        return a

    def delete_action(self, ns_name: str, name: str) -> dict:
        ns = self.ns(ns_name)
        with self.lock:
            a = ns.actions.pop(name, None)
            if a is None:
                raise ApiError(404, MSG_NOT_FOUND)
            ops = self._retire(ns.name, name, keep_version=None)
            for act in self.queues.pop((ns.name, name), deque()):
                self._complete(act, WHISK_ERROR, {"error": MSG_REMOVED})
        self._run_ops(ops)
        shutil.rmtree(self.actions_dir / ns.name / name, ignore_errors=True)
        return a.to_json(code=False)

    def list_actions(self, ns_name: str, limit: int, skip: int) -> list[dict]:
        ns = self.ns(ns_name)
        acts = sorted(ns.actions.values(), key=lambda a: -a.updated)
        return [a.to_json(code=False) for a in acts[skip:skip + limit if limit else None]]

    # ------------------------------------------------------------------ invoke
    def invoke(self, ns_name: str, name: str, payload: dict) -> Activation:
        ns = self.ns(ns_name)
        action = ns.actions.get(name)
        if action is None:
            raise ApiError(404, MSG_NOT_FOUND)
        if _annotation(action.annotations, "final") is True and action.parameters:
            bound = {p["key"] for p in action.parameters}
            if bound & payload.keys():
                raise ApiError(400, MSG_PARAMS_NOT_ALLOWED)
        args = {p["key"]: p["value"] for p in action.parameters}
        args.update(payload)
        ops: list = []
        with self.lock:
            now = time.time()
            fault = None
            slow_ms = 0
            if ns.faults is not None:
                n = ns.fault_counters.get(name, 0)
                ns.fault_counters[name] = n + 1
                fault = ns.faults.draw(ns.name, name, n)
                if ns.faults.applies_to(name):
                    slow_ms = ns.faults.slow_ms
            if fault == "throttle":
                ns.counts["throttled"] += 1
                # An injected throttle stands in for the per-minute limit.
                self.events.limit(ns.name, concurrent=False)
                raise ApiError(429, "Too many requests: throttled by the fabric's injected faults.")
            window = ns.minute
            while window and window[0] <= now - 60.0:
                window.popleft()
            if len(window) >= ns.invocations_per_minute:
                ns.counts["throttled"] += 1
                self.events.limit(ns.name, concurrent=False)
                raise ApiError(429, msg_too_many_per_minute(len(window) + 1, ns.invocations_per_minute))
            if ns.inflight >= ns.concurrent_invocations:
                ns.counts["throttled"] += 1
                self.events.limit(ns.name, concurrent=True)
                raise ApiError(429, msg_too_many_concurrent(ns.inflight + 1, ns.concurrent_invocations))
            window.append(now)
            ns.inflight += 1
            ns.counts["invocations"] += 1
            act = Activation(uuid.uuid4().hex, ns, action, args, fault, slow_ms)
            if action.run_error is not None:
                act.start = act.received
                self._complete(act, DEVELOPER_ERROR, {"error": action.run_error})
            elif fault == "timeout":
                act.start = act.received
                self._complete(act, DEVELOPER_ERROR, {"error": msg_timeout(action.timeout_ms)},
                               timed_out=True)
            else:
                key = (ns.name, name)
                self.queues.setdefault(key, deque()).append(act)
                ops = self._pump(key)
        self._run_ops(ops)
        return act

    # ------------------------------------------------------------------ scheduling
    def _pump(self, key: tuple[str, str]) -> list:
        """Hand queued activations of one action to workers (lock held).
        Returns the I/O to do once the lock is released."""
        ops: list = []
        q = self.queues.get(key)
        if not q:
            return ops
        action = self.namespaces[key[0]].actions.get(key[1])
        if action is None:
            while q:
                self._complete(q.popleft(), WHISK_ERROR, {"error": MSG_REMOVED})
            return ops
        while q:
            w = self._free_worker(key, action.version)
            if w is None:
                w = self._new_worker(action, ops)
                if w is None:
                    break
            act = q.popleft()
            act.action = action
            w.assigned[act.id] = act
            act.worker = w
            if w.state == "ready":
                self._start(w, act, time.time(), ops)
            else:
                w.pending.append(act)
        if not q:
            self.queues.pop(key, None)
        return ops

    def _free_worker(self, key, version) -> Worker | None:
        best = None
        for w in self.pools.get(key, ()):
            if w.version != version or w.retired or w.state == "dead" or w.kill_reason or w.free <= 0:
                continue
            # Prefer ready workers, then the fullest (packing keeps the
            # others idle, so they can be reaped), then the most recently used.
            rank = (w.state == "ready", -w.free, w.last_used)
            if best is None or rank > best[0]:
                best = (rank, w)
        return best[1] if best else None

    def _new_worker(self, action: Action, ops: list) -> Worker | None:
        need = int(action.limits["memory"])
        if self.memory_used + need > self.settings.user_memory_mb:
            idle = sorted((w for w in self.workers if w.state == "ready" and not w.assigned
                           and not w.kill_reason), key=lambda w: w.last_used)
            for w in idle:
                if self.memory_used + need <= self.settings.user_memory_mb:
                    break
                self._evict(w, "evicted", ops)
            if self.memory_used + need > self.settings.user_memory_mb:
                return None
        w = Worker(action)
        self.workers.add(w)
        self.pools.setdefault(w.key, []).append(w)
        self.memory_used += w.memory_mb
        ops.append(("spawn", w))
        return w

    def _evict(self, w: Worker, reason: str, ops: list) -> None:
        """Take a worker out of service (lock held); its memory is free at once."""
        if w.kill_reason is None:
            w.kill_reason = reason
        pool = self.pools.get(w.key)
        if pool and w in pool:
            pool.remove(w)
            if not pool:
                self.pools.pop(w.key, None)
        if w in self.workers:
            self.workers.discard(w)
            self.memory_used -= w.memory_mb
        ops.append(("kill", w))

    def _retire(self, ns: str, name: str, keep_version: int | None) -> list:
        ops: list = []
        for w in list(self.pools.get((ns, name), ())):
            if keep_version is not None and w.version == keep_version:
                continue
            w.retired = True
            if not w.assigned and not w.pending:
                self._evict(w, "retired", ops)
        return ops

    def _start(self, w: Worker, act: Activation, now: float, ops: list) -> None:
        act.start = act.start or now
        act.deadline = act.start + act.action.timeout_ms / 1000.0
        w.runs += 1
        ops.append(("send", w, act))

    def _run_ops(self, ops: list) -> None:
        for op in ops:
            kind, w = op[0], op[1]
            if kind == "spawn":
                self._spawn(w)
            elif kind == "kill":
                w.kill()
                if w.proc is None:  # never started: nothing will report its death
                    with self.lock:
                        self._worker_died(w)
            elif kind == "send":
                act: Activation = op[2]
                a = act.action
                env = {"__OW_ACTIVATION_ID": act.id, "__OW_DEADLINE": str(int(act.deadline * 1000)),
                       "__OW_ACTION_NAME": f"/{a.namespace}/{a.name}", "__OW_ACTION_VERSION": a.semver,
                       "__OW_NAMESPACE": a.namespace, "__OW_API_HOST": self.api_host,
                       "__OW_TRANSACTION_ID": act.id}
                # Newer OpenWhisk hands the key to an action only when it is
                # annotated provide-api-key.
                if _annotation(a.annotations, "provide-api-key") is True:
                    env["__OW_API_KEY"] = self.auth
                try:
                    w.send({"t": "run", "id": act.id, "args": act.args, "env": env,
                            "slow_ms": act.slow_ms, "crash": act.fault == "crash"})
                except (OSError, TypeError, ValueError) as exc:
                    # A dead worker is reported by its reader; unserialisable
                    # args cannot happen with args parsed from JSON.
                    log.debug("send to worker %s failed: %s", w.id, exc)
                    w.kill()

    def _spawn(self, w: Worker) -> None:
        a = w.action
        if w.kill_reason is not None or w.state == "dead":
            return
        parent, child = socket.socketpair()
        try:
            logf = open(self.logs_dir / f"{a.namespace}.{a.name}.log", "ab")
            try:
                w.proc = subprocess.Popen(
                    [sys.executable, "-u", WORKER_SCRIPT, str(child.fileno()), a.code_dir,
                     str(a.exec.get("main") or "main"), str(w.capacity)],
                    pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                    cwd=a.code_dir, close_fds=True)
            finally:
                logf.close()
        except OSError as exc:
            parent.close()
            child.close()
            with self.lock:
                w.init_error = f"could not start a worker process: {exc}"
                self._worker_died(w)
            return
        child.close()
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        w.sock = parent
        threading.Thread(target=self._reader, args=(w,), name=f"worker-{w.id}", daemon=True).start()

    def _reader(self, w: Worker) -> None:
        sock = w.sock
        try:
            while True:
                hdr = _recv_exact(sock, 4)
                if hdr is None:
                    break
                body = _recv_exact(sock, _HDR.unpack(hdr)[0])
                if body is None:
                    break
                try:
                    msg = json.loads(body)
                except ValueError:
                    break
                ops: list = []
                with self.lock:
                    t = msg.get("t")
                    if t == "ready":
                        now = time.time()
                        w.state = "ready"
                        w.init_ms = float(msg.get("init_ms") or 0.0)
                        w.last_used = now
                        for act in w.pending:
                            act.cold = True
                            act.init_ms = w.init_ms
                            act.ns.counts["cold_starts"] += 1
                            # A cold activation starts with its code load, as
                            # OpenWhisk's duration includes initTime.
                            act.start = max(act.received, now - w.init_ms / 1000.0)
                            self._start(w, act, now, ops)
                        w.pending.clear()
                        if w.kill_reason:
                            ops.append(("kill", w))
                    elif t == "init_error":
                        w.init_error = str(msg.get("error"))
                    elif t == "done":
                        act = w.assigned.pop(msg.get("id"), None)
                        if act is not None:
                            w.last_used = time.time()
                            if "dev_error" in msg:
                                self._complete(act, DEVELOPER_ERROR, {"error": msg["dev_error"]})
                            else:
                                res = msg.get("result")
                                code = APPLICATION_ERROR if isinstance(res, dict) and "error" in res \
                                    else SUCCESS
                                self._complete(act, code, res)
                            if w.retired and not w.assigned:
                                self._evict(w, "retired", ops)
                            else:
                                ops.extend(self._pump(w.key))
                            ops.extend(self._pump_waiting(exclude=w.key))
                self._run_ops(ops)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            if w.proc is not None:
                with contextlib.suppress(Exception):
                    w.proc.wait(timeout=5)
            with self.lock:
                ops = self._worker_died(w)
            self._run_ops(ops)

    def _worker_died(self, w: Worker) -> list:
        """Fail what the dead worker held (lock held); returns follow-up I/O."""
        ops: list = []
        w.state = "dead"
        if w in self.workers:
            self.workers.discard(w)
            self.memory_used -= w.memory_mb
        pool = self.pools.get(w.key)
        if pool and w in pool:
            pool.remove(w)
            if not pool:
                self.pools.pop(w.key, None)
        if w.init_error:
            err = msg_init_failed(w.init_error)
        elif w.kill_reason == "memory":
            err = MSG_MEMORY
        else:
            err = MSG_ABNORMAL_RUN
        for act in list(w.assigned.values()):
            if act.start is None:
                act.start = time.time()
            self._complete(act, DEVELOPER_ERROR, {"error": err})
        w.assigned.clear()
        w.pending.clear()
        if not self.stopping:
            ops.extend(self._pump(w.key))
            ops.extend(self._pump_waiting(exclude=w.key))
        return ops

    def _pump_waiting(self, exclude) -> list:
        ops: list = []
        for key in list(self.queues):
            if key != exclude:
                ops.extend(self._pump(key))
        return ops

    # ------------------------------------------------------------------ records
    def _complete(self, act: Activation, code: int, result: Any, timed_out: bool = False) -> None:
        """Turn a finished activation into its record (lock held)."""
        if act.record is not None:
            return
        now = time.time()
        act.end = now
        start = act.start if act.start is not None else now
        start_ms = int(start * 1000)
        end_ms = max(int(now * 1000), start_ms)
        a = act.action
        wait_ms = max(0, int((start - act.received) * 1000))
        init_ms = int(round(act.init_ms)) if act.cold and act.init_ms is not None else None
        if not isinstance(result, dict):
            code, result = DEVELOPER_ERROR, {"error": MSG_ABNORMAL_RUN}
        result_json = json.dumps(result, separators=(",", ":"))
        annotations = [
            {"key": "path", "value": f"{a.namespace}/{a.name}"},
            {"key": "waitTime", "value": wait_ms},
            {"key": "kind", "value": a.exec.get("kind")},
            {"key": "timeout", "value": timed_out},
            {"key": "limits", "value": {"concurrency": a.limits["concurrency"], "logs": a.limits["logs"],
                                        "memory": a.limits["memory"], "timeout": a.limits["timeout"]}},
        ]
        if init_ms is not None:
            annotations.append({"key": "initTime", "value": init_ms})
        if act.fault:
            annotations.append({"key": "fk-fault", "value": act.fault})
        ns = act.ns
        head = (f'{{"namespace":{json.dumps(ns.name)},"name":{json.dumps(a.name)},'
                f'"version":"{a.semver}","subject":{json.dumps(ns.name)},'
                f'"activationId":"{act.id}","start":{start_ms},"end":{end_ms},'
                f'"duration":{end_ms - start_ms},')
        ann = json.dumps(annotations, separators=(",", ":"))
        doc = (head + f'"response":{{"status":"{STATUS[code]}","statusCode":{code},'
               f'"success":{"true" if code == SUCCESS else "false"},"result":{result_json},'
               f'"size":{len(result_json)}}},"logs":[],"annotations":{ann},"publish":false}}').encode()
        summary = (head + f'"statusCode":{code},"annotations":{ann},"publish":false}}').encode()
        act.record = doc
        act.status = code
        # The activation event OpenWhisk's invoker sends for its record: the
        # action's namespace, the invoking subject's namespace (the same one
        # here: the fabric has no packages shared across namespaces), the
        # record's own millisecond timings.
        self.events.activation(ns.name, ns.name, a.name, str(a.exec.get("kind")), int(a.limits["memory"]),
                               code, end_ms - start_ms, wait_ms, init_ms, len(result_json),
                               _user_status_code(result))
        seq = next(ns.seq)
        entry = (start_ms, seq, act.id)
        ns.records[act.id] = (start_ms, a.name, doc, summary)
        _insort(ns.index, entry)
        _insort(ns.by_name.setdefault(a.name, []), entry)
        ns.inflight -= 1
        if len(ns.records) > self.settings.max_records * 1.1:
            self._trim(ns)
        act.done.set()

    def _trim(self, ns: Namespace) -> None:
        drop = len(ns.index) - self.settings.max_records
        gone = ns.index[:drop]
        del ns.index[:drop]
        names = set()
        for _, _, aid in gone:
            rec = ns.records.pop(aid, None)
            if rec:
                names.add(rec[1])
        for n in names:
            ns.by_name[n] = [e for e in ns.by_name[n] if e[2] in ns.records]

    def get_activation(self, ns_name: str, aid: str) -> tuple[int, str, bytes, bytes]:
        rec = self.ns(ns_name).records.get(aid)
        if rec is None:
            raise ApiError(404, MSG_NOT_FOUND)
        return rec

    def list_activations(self, ns_name: str, name: str | None, since: int | None, upto: int | None,
                         limit: int, skip: int, docs: bool) -> list[bytes]:
        ns = self.ns(ns_name)
        with self.lock:
            idx = ns.by_name.get(name, []) if name else ns.index
            lo = bisect.bisect_left(idx, (since, -1, "")) if since is not None else 0
            hi = bisect.bisect_right(idx, (upto, float("inf"), "")) if upto is not None else len(idx)
            # Newest first, as OpenWhisk lists.
            stop = max(lo, hi - skip)
            sel = idx[max(lo, stop - limit):stop]
            part = 2 if docs else 3
            return [ns.records[e[2]][part] for e in reversed(sel)]

    def count_activations(self, ns_name: str, name: str | None, since: int | None,
                          upto: int | None) -> int:
        ns = self.ns(ns_name)
        with self.lock:
            idx = ns.by_name.get(name, []) if name else ns.index
            lo = bisect.bisect_left(idx, (since, -1, "")) if since is not None else 0
            hi = bisect.bisect_right(idx, (upto, float("inf"), "")) if upto is not None else len(idx)
            return max(0, hi - lo)

    # ------------------------------------------------------------------ limits, faults, status
    def limits(self, ns_name: str) -> dict:
        ns = self.ns(ns_name)
        return {"invocationsPerMinute": ns.invocations_per_minute,
                "concurrentInvocations": ns.concurrent_invocations,
                "firesPerMinute": 60,
                "minActionMemory": 128, "maxActionMemory": self.settings.user_memory_mb,
                "minActionLogs": 0, "maxActionLogs": 10,
                "minActionTimeout": 100, "maxActionTimeout": 3600000,
                "minActionConcurrency": 1, "maxActionConcurrency": 500,
                "maxParameterSize": self.settings.payload_limit,
                "maxPayloadSize": self.settings.payload_limit,
                "maxActionInstances": ns.concurrent_invocations}

    def set_limits(self, ns_name: str, body: Any) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "limits must be a JSON object")
        ns = self.ns(ns_name)
        per_ns = {"concurrentInvocations": "concurrent_invocations",
                  "invocationsPerMinute": "invocations_per_minute"}
        glob = {"payloadLimit": "payload_limit", "idleSeconds": "idle_s",
                "userMemoryMb": "user_memory_mb", "blockingWaitSeconds": "blocking_wait_s",
                "maxRecords": "max_records"}
        unknown = set(body) - set(per_ns) - set(glob)
        if unknown:
            raise ApiError(400, f"unknown limit keys: {sorted(unknown)}")
        for k, v in body.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ApiError(400, f"{k} must be a positive number")
        with self.lock:
            for k, attr in per_ns.items():
                if k in body:
                    setattr(ns, attr, int(body[k]))
            for k, attr in glob.items():
                if k in body:
                    cur = getattr(self.settings, attr)
                    setattr(self.settings, attr, type(cur)(body[k]))
            if "invocationsPerMinute" in body:
                ns.minute.clear()
        return self.limits(ns.name)

    def set_faults(self, ns_name: str, body: Any) -> dict:
        ns = self.ns(ns_name)
        try:
            faults = Faults.parse(body) if body else None
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc)) from None
        with self.lock:
            ns.faults = faults
            # A new configuration restarts the sequence, so that a seed
            # reproduces the same faults from here on.
            ns.fault_counters.clear()
        return faults.to_json() if faults else {}

    def status(self) -> dict:
        with self.lock:
            return {"pid": os.getpid(), "memory_used_mb": self.memory_used,
                    "user_memory_mb": self.settings.user_memory_mb,
                    "workers": [w.describe() for w in sorted(self.workers, key=lambda w: w.id)],
                    "namespaces": {n.name: {"inflight": n.inflight, "records": len(n.records),
                                            "actions": sorted(n.actions), **n.counts,
                                            "faults": n.faults.to_json() if n.faults else None}
                                   for n in self.namespaces.values()},
                    "queued": {f"{k[0]}/{k[1]}": len(q) for k, q in self.queues.items()}}

    # ------------------------------------------------------------------ housekeeping
    def _housekeeping(self) -> None:
        """Time limits (every 20 ms), memory limits, idle workers."""
        next_mem = next_idle = 0.0
        while not self.stopping:
            time.sleep(0.02)
            now = time.time()
            ops: list = []
            with self.lock:
                for w in list(self.workers):
                    if w.state != "ready" or not w.assigned:
                        continue
                    late = [a for a in w.assigned.values() if a.deadline is not None and now > a.deadline]
                    if late:
                        for a in late:
                            w.assigned.pop(a.id, None)
                            self._complete(a, DEVELOPER_ERROR, {"error": msg_timeout(a.action.timeout_ms)},
                                           timed_out=True)
                        # The worker is killed as OpenWhisk removes the
                        # container; anything else it held fails with it.
                        self._evict(w, "timeout", ops)
                for w in list(self.workers):
                    # A code load that never finishes: OpenWhisk's init timeout.
                    limit_ms = w.action.timeout_ms
                    if w.state == "starting" and w.pending and now - w.spawned > limit_ms / 1000.0 + 5.0:
                        for a in w.pending:
                            w.assigned.pop(a.id, None)
                            a.start = a.start or w.spawned
                            a.cold = True
                            self._complete(a, DEVELOPER_ERROR, {"error": msg_timeout(limit_ms)[:-1]
                                                                + " during initialization."},
                                           timed_out=True)
                        w.pending.clear()
                        self._evict(w, "timeout", ops)
                if now >= next_idle:
                    next_idle = now + min(1.0, self.settings.idle_s / 4)
                    for w in list(self.workers):
                        if (w.state == "ready" and not w.assigned
                                and now - w.last_used > self.settings.idle_s):
                            self._evict(w, "idle", ops)
                mem_check = now >= next_mem
                watch = [w for w in self.workers if w.state == "ready" and w.proc] if mem_check else []
                if mem_check:
                    next_mem = now + self.settings.memory_check_s
            self._run_ops(ops)
            for w in watch:
                rss = _rss_bytes(w)
                if rss is not None and rss > w.memory_mb * 1024 * 1024:
                    ops = []
                    with self.lock:
                        if w.kill_reason is None:
                            log.info("worker %s of %s/%s exceeded %d MB (RSS %d MB)", w.id, *w.key,
                                     w.memory_mb, rss // (1024 * 1024))
                            self._evict(w, "memory", ops)
                    self._run_ops(ops)

    def shutdown(self) -> None:
        with self.lock:
            self.stopping = True
            workers = list(self.workers) + [w for p in self.pools.values() for w in p]
        for w in set(workers):
            w.kill()
        for w in set(workers):
            if w.proc is not None:
                with contextlib.suppress(Exception):
                    w.proc.wait(timeout=5)


def _rss_bytes(w: Worker) -> int | None:
    try:
        with open(f"/proc/{w.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
        if w.psutil_proc is None:
            w.psutil_proc = psutil.Process(w.proc.pid)
        return w.psutil_proc.memory_info().rss
    except Exception:  # the process is gone; its reader reports that
        return None


def _insort(lst: list, entry: tuple) -> None:
    # Activations finish roughly in start order: appending is the common case.
    if not lst or lst[-1] <= entry:
        lst.append(entry)
    else:
        bisect.insort(lst, entry)


# --------------------------------------------------------------------------- HTTP

_ROUTE = re.compile(r"^/api/v1/namespaces/([^/]+)/(actions|activations|limits)(?:/(.*?))?/?$")


def _qbool(q: dict, key: str, default: bool = False) -> bool:
    v = q.get(key)
    if v is None:
        return default
    return v[-1].lower() in ("true", "1", "yes", "")


def _qint(q: dict, key: str, default: int | None = None) -> int | None:
    v = q.get(key)
    if v is None or v[-1] == "":
        return default
    try:
        return int(v[-1])
    except ValueError:
        raise ApiError(400, f"Parameter {key} must be an integer: {v[-1]}") from None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Without this, every keep-alive response waits ~40 ms for Nagle's
    # algorithm and the delayed ACK of the client.
    disable_nagle_algorithm = True
    server_version = "fedkeeper-fabric"
    fabric: Fabric = None  # set on the subclass made by make_server
    auth_header: str = ""

    def log_message(self, fmt, *args):  # no per-request logging: the hot path
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write: one segment per small response.
        self._headers_buffer.append(b"\r\n")
        self._headers_buffer.append(body)
        self.wfile.write(b"".join(self._headers_buffer))
        self._headers_buffer = []

    def _json(self, status: int, obj: Any, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), headers)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message, "code": uuid.uuid4().hex})

    def _body(self, limit: int) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        if n > limit:
            # The body is not read: close the connection after answering.
            self.close_connection = True
            raise ApiError(413, f"The request content was malformed:\nRequest entity too large: "
                                f"{n} > {limit} bytes.")
        if n == 0:
            return None
        raw = self.rfile.read(n)
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(400, "The request content was malformed: not valid JSON.") from None

    def _handle(self, method: str) -> None:
        try:
            if method == "GET" and self.path.split("?", 1)[0] == "/metrics":
                # Unauthenticated, as OpenWhisk's user-events service serves
                # it: Prometheus scrapes without the namespace's key.
                body = self.fabric.events.exposition()
                return self._send(200, body, content_type=METRICS_CONTENT_TYPE)
            if not hmac.compare_digest(self.headers.get("Authorization", ""), self.auth_header):
                # Drain a body we will not read, so keep-alive stays in step.
                n = int(self.headers.get("Content-Length") or 0)
                if 0 < n <= self.fabric.settings.code_limit:
                    self.rfile.read(n)
                elif n:
                    self.close_connection = True
                raise ApiError(401, MSG_BAD_AUTH)
            url = urlsplit(self.path)
            q = parse_qs(url.query, keep_blank_values=True)
            path = url.path
            if path.startswith("/_fabric/"):
                return self._admin(method, path, q)
            if path.rstrip("/") == "/api/v1/namespaces" and method == "GET":
                return self._json(200, sorted(set(self.fabric.namespaces) | {DEFAULT_NAMESPACE}))
            m = _ROUTE.match(path)
            if not m:
                raise ApiError(404, MSG_NOT_FOUND)
            ns, coll, rest = unquote(m.group(1)), m.group(2), unquote(m.group(3) or "")
            if coll == "actions":
                return self._actions(method, ns, rest, q)
            if coll == "activations":
                return self._activations(method, ns, rest, q)
            if coll == "limits" and method == "GET" and not rest:
                return self._json(200, self.fabric.limits(ns))
            raise ApiError(405 if not rest else 404, "Method not allowed." if not rest else MSG_NOT_FOUND)
        except ApiError as exc:
            self._error(exc.status, exc.message)
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True
        except Exception:  # a bug in the fabric must not kill the connection silently
            log.exception("fabric request %s %s failed", method, self.path)
            self._error(500, "There was an error processing your request.")

    do_GET = lambda self: self._handle("GET")        # noqa: E731
    do_PUT = lambda self: self._handle("PUT")        # noqa: E731
    do_POST = lambda self: self._handle("POST")      # noqa: E731
    do_DELETE = lambda self: self._handle("DELETE")  # noqa: E731

    def _actions(self, method: str, ns: str, name: str, q: dict) -> None:
        f = self.fabric
        if not name:
            if method != "GET":
                raise ApiError(405, "Method not allowed.")
            limit = _qint(q, "limit", 30) or 0
            return self._json(200, f.list_actions(ns, min(limit, 200) if limit else 0,
                                                  _qint(q, "skip", 0) or 0))
        if method == "PUT":
            body = self._body(f.settings.code_limit)
            return self._json(200, f.put_action(ns, name, body, _qbool(q, "overwrite")))
        if method == "GET":
            return self._json(200, f.get_action(ns, name).to_json(code=_qbool(q, "code", True)))
        if method == "DELETE":
            return self._json(200, f.delete_action(ns, name))
        if method == "POST":
            return self._invoke(ns, name, q)
        raise ApiError(405, "Method not allowed.")

    def _invoke(self, ns: str, name: str, q: dict) -> None:
        f = self.fabric
        payload = self._body(f.settings.payload_limit)
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            raise ApiError(400, "The request content was malformed: the payload must be a JSON object.")
        blocking = _qbool(q, "blocking")
        want_result = _qbool(q, "result")
        act = f.invoke(ns, name, payload)
        hdr = {"x-openwhisk-activation-id": act.id}
        if blocking:
            wait_ms = _qint(q, "timeout", None)
            wait = f.settings.blocking_wait_s if wait_ms is None else min(wait_ms / 1000.0,
                                                                          f.settings.blocking_wait_s)
            if act.done.wait(max(0.0, wait)):
                status = {SUCCESS: 200, APPLICATION_ERROR: 502, DEVELOPER_ERROR: 502}.get(act.status, 500)
                if want_result:
                    body = json.loads(act.record)["response"]["result"]
                    return self._json(status, body, hdr)
                return self._send(status, act.record, hdr)
        return self._send(202, b'{"activationId":"' + act.id.encode() + b'"}', hdr)

    def _activations(self, method: str, ns: str, rest: str, q: dict) -> None:
        if method != "GET":
            raise ApiError(405, "Method not allowed.")
        f = self.fabric
        if not rest:
            name = (q.get("name") or [""])[-1] or None
            if name and "/" in name:
                name = name.split("/")[-1]
            since, upto = _qint(q, "since"), _qint(q, "upto")
            if _qbool(q, "count"):
                return self._json(200, {"activations": f.count_activations(ns, name, since, upto)})
            limit = _qint(q, "limit", 30)
            if limit < 0 or limit > 200:
                raise ApiError(400, f"The value {limit} is not in the range of 0 to 200.")
            skip = _qint(q, "skip", 0)
            if skip < 0:
                raise ApiError(400, f"The value {skip} must be non-negative.")
            docs = f.list_activations(ns, name, since, upto, limit or 200, skip, _qbool(q, "docs"))
            return self._send(200, b"[" + b",".join(docs) + b"]")
        aid, _, sub = rest.partition("/")
        _, _, doc, _ = f.get_activation(ns, aid)
        if not sub:
            return self._send(200, doc)
        if sub == "result":
            return self._json(200, json.loads(doc)["response"])
        if sub == "logs":
            return self._json(200, {"logs": []})
        raise ApiError(404, MSG_NOT_FOUND)

    def _admin(self, method: str, path: str, q: dict) -> None:
        f = self.fabric
        ns = (q.get("namespace") or ["_"])[-1]
        what = path[len("/_fabric/"):].strip("/")
        if what == "faults":
            if method == "PUT":
                return self._json(200, f.set_faults(ns, self._body(f.settings.payload_limit)))
            if method == "GET":
                n = f.ns(ns)
                return self._json(200, n.faults.to_json() if n.faults else {})
        elif what == "limits":
            if method == "PUT":
                return self._json(200, f.set_limits(ns, self._body(f.settings.payload_limit)))
            if method == "GET":
                return self._json(200, f.limits(ns))
        elif what == "status" and method == "GET":
            return self._json(200, f.status())
        raise ApiError(404, MSG_NOT_FOUND)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


def make_server(fabric: Fabric, host: str = "127.0.0.1", port: int = 0) -> _Server:
    handler = type("FabricHandler", (Handler,),
                   {"fabric": fabric,
                    "auth_header": "Basic " + base64.b64encode(fabric.auth.encode()).decode()})
    return _Server((host, port), handler)


# --------------------------------------------------------------------------- process management

def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _auth_for(sdir: Path) -> str:
    """The fabric's key, generated once per state directory (mode 0600)."""
    p = sdir / AUTH_FILE
    if p.exists():
        value = p.read_text().strip()
        if ":" in value:
            return value
    value = f"{uuid.uuid4()}:{secrets.token_hex(32)}"
    _write_private(p, value)
    return value


def serve(state_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
          settings: Settings | None = None) -> None:
    """Run the fabric in this process until SIGTERM/SIGINT."""
    sdir = Path(state_dir).resolve()
    sdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    auth = _auth_for(sdir)
    fabric = Fabric(sdir, settings or Settings(), auth)
    httpd = make_server(fabric, host, port)
    real_port = httpd.server_address[1]
    url = f"http://{host}:{real_port}"
    fabric.api_host = url
    info = {"url": url, "host": host, "port": real_port, "pid": os.getpid(), "auth": auth,
            "namespace": DEFAULT_NAMESPACE, "started_at": time.time()}
    _write_private(sdir / STATE_FILE, json.dumps(info))

    def stop(signum, frame):
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("fabric listening on %s (pid %d)", url, os.getpid())
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        fabric.shutdown()
        httpd.server_close()
        with contextlib.suppress(OSError, ValueError):
            cur = json.loads((sdir / STATE_FILE).read_text())
            if cur.get("pid") == os.getpid():
                (sdir / STATE_FILE).unlink()
        log.info("fabric stopped")


# Fabric processes started by this process, so that they can be reaped.
_CHILDREN: dict[int, subprocess.Popen] = {}


@contextlib.contextmanager
def _locked(sdir: Path):
    with open(sdir / "fabric.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_state(sdir: Path) -> dict | None:
    try:
        return json.loads((Path(sdir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    return pid_alive(pid)


def _is_fabric_process(pid: int) -> bool:
    """Guards signals against a recycled pid."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"fedkeeper.local.fabric" in f.read()
    except OSError:
        return pid in _CHILDREN


def _answers(info: dict, timeout: float = 2.0) -> bool:
    try:
        conn = http.client.HTTPConnection(info["host"], int(info["port"]), timeout=timeout)
        try:
            conn.request("GET", "/api/v1/namespaces/_/limits", headers={
                "Authorization": "Basic " + base64.b64encode(info["auth"].encode()).decode()})
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except (OSError, KeyError, ValueError, http.client.HTTPException):
        return False


def fabric_status(state_dir: str | os.PathLike) -> dict | None:
    """The running fabric's info (url, auth, pid, port, ...) or None."""
    info = _read_state(Path(state_dir))
    if not info or not _alive(int(info.get("pid", 0))) or not _answers(info):
        return None
    return info


def fabric_up(state_dir: str | os.PathLike, *, port: int = 0, timeout_s: float = 30.0,
              extra_args: list[str] | None = None) -> dict:
    """Start the fabric for this state directory, or reuse the running one.
    Returns its info with started=True when this call started it."""
    sdir = Path(state_dir).resolve()
    sdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(sdir):
        info = fabric_status(sdir)
        if info is not None:
            return {**info, "started": False}
        stale = _read_state(sdir)
        if stale and _alive(int(stale.get("pid", 0))) and _is_fabric_process(int(stale["pid"])):
            # Running but not answering: stop it rather than start a second one.
            _stop_pid(int(stale["pid"]), 5.0)
        with contextlib.suppress(FileNotFoundError):
            (sdir / STATE_FILE).unlink()
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "fedkeeper.local.fabric", "serve",
               "--state-dir", str(sdir), "--port", str(port)] + list(extra_args or [])
        with open(sdir / LOG_FILE, "ab") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True, close_fds=True, env=env)
        _CHILDREN[proc.pid] = proc
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FabricError(f"the local fabric exited at start (status {proc.returncode}); "
                                  f"see {sdir / LOG_FILE}:\n{_tail(sdir / LOG_FILE)}")
            info = _read_state(sdir)
            if info and info.get("pid") == proc.pid and _answers(info, timeout=1.0):
                return {**info, "started": True}
            time.sleep(0.02)
        _stop_pid(proc.pid, 2.0)
        raise FabricError(f"the local fabric did not answer within {timeout_s:.0f}s; see {sdir / LOG_FILE}")


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _stop_pid(pid: int, grace_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)
    if _alive(pid):
        # The fabric leads its own session and process group (its workers
        # are in it): take the whole group down.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)


def fabric_down(state_dir: str | os.PathLike, grace_s: float = 10.0) -> bool:
    """Stop the fabric of this state directory and its workers. False when
    none was running."""
    sdir = Path(state_dir).resolve()
    if not sdir.is_dir():
        return False
    with _locked(sdir):
        info = _read_state(sdir)
        if not info:
            return False
        pid = int(info.get("pid", 0))
        running = pid > 0 and _alive(pid) and _is_fabric_process(pid)
        if running:
            _stop_pid(pid, grace_s)
        with contextlib.suppress(FileNotFoundError):
            (sdir / STATE_FILE).unlink()
        return running


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedkeeper.local.fabric",
                                description="The embedded local OpenWhisk fabric.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the fabric in the foreground")
    s.add_argument("--state-dir", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    d = Settings()
    s.add_argument("--user-memory-mb", type=int, default=d.user_memory_mb)
    s.add_argument("--concurrent-invocations", type=int, default=d.concurrent_invocations)
    s.add_argument("--invocations-per-minute", type=int, default=d.invocations_per_minute)
    s.add_argument("--payload-limit", type=int, default=d.payload_limit)
    s.add_argument("--idle-s", type=float, default=d.idle_s)
    s.add_argument("--max-records", type=int, default=d.max_records)
    for name in ("up", "down", "status"):
        c = sub.add_parser(name)
        c.add_argument("--state-dir", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.cmd == "serve":
        serve(a.state_dir, a.host, a.port, Settings(
            payload_limit=a.payload_limit, concurrent_invocations=a.concurrent_invocations,
            invocations_per_minute=a.invocations_per_minute, idle_s=a.idle_s,
            user_memory_mb=a.user_memory_mb, max_records=a.max_records))
        return 0
    if a.cmd == "up":
        info = fabric_up(a.state_dir)
        print(json.dumps({k: v for k, v in info.items() if k != "auth"}))
        return 0
    if a.cmd == "down":
        print("stopped" if fabric_down(a.state_dir) else "not running")
        return 0
    info = fabric_status(a.state_dir)
    print(json.dumps({k: v for k, v in info.items() if k != "auth"}) if info else "not running")
    return 0 if info else 1


if __name__ == "__main__":
    sys.exit(main())
