"""What the fabric keeps: settings, namespaces, actions and activations."""
from __future__ import annotations

import hashlib
import itertools
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..faults import FaultPlan
from .records import ActivationRecords
from .status import ApiError

if TYPE_CHECKING:
    from .workers import Worker

DEFAULT_NAMESPACE = "guest"
# OpenWhisk's entity names: up to 256 characters, no leading special one.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_@.\- ]{0,255}")
# A name longer than this is stored on disk under a shortened, hashed form
# (file names are limited to 255 bytes).
_DISK_NAME_MAX = 120


def valid_name(name: str) -> bool:
    """The whole name matches (a trailing newline does not pass)."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def disk_name(name: str) -> str:
    if len(name) <= _DISK_NAME_MAX:
        return name
    return name[:_DISK_NAME_MAX - 17] + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]


#: An OpenWhisk invoker's default user memory (`CONFIG_whisk_containerPool_userMemory`,
#: 2048m): the sum of the memory limits of the containers it runs at once.
DEFAULT_USER_MEMORY_MB = 2048
#: Stem cells started per runtime (OpenWhisk's default runtime manifest
#: prewarms 2 of its python kind; on a small machine one TensorFlow cell is
#: what a first cold start needs, and each one holds a few hundred MB).
DEFAULT_STEM_CELLS = {"tensorflow": 1}
#: What a stem cell counts against the user memory until an action takes it
#: (OpenWhisk's stem cells are 256 MB containers).
DEFAULT_STEM_MEMORY_MB = 256
def parse_stem_cells(text: str) -> dict[str, int]:
    """`tensorflow=1,light=2` (or empty: none) -> {runtime: count}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition("=")
        if not sep or not name.strip() or not count.strip().isdigit() or int(count) > 16:
            raise ValueError(f"{part!r} is not RUNTIME=COUNT (a count from 0 to 16)")
        out[name.strip()] = int(count)
    return out


@dataclass
class Settings:
    payload_limit: int = 1048576           # bytes of an invoke request body (OpenWhisk: 1 MB)
    code_limit: int = 64 * 1024 * 1024     # bytes of an action PUT body (zip in base64)
    concurrent_invocations: int = 1000     # per namespace, queued or running
    invocations_per_minute: int = 60000    # per namespace, rolling minute
    blocking_wait_s: float = 60.0          # OpenWhisk's maximum blocking wait
    idle_s: float = 600.0                  # idle worker lifetime
    user_memory_mb: int = DEFAULT_USER_MEMORY_MB  # sum of limits.memory of workers (and stem cells)
    stem_cells: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_STEM_CELLS))  # per runtime
    stem_memory_mb: int = DEFAULT_STEM_MEMORY_MB  # what an untaken stem cell counts
    fork_stem_cells: bool = True           # stem cells forked from their runtime's zygote
    max_records: int = 100000              # activation records kept per namespace, at most
    record_bytes: int = 128 * 1024 * 1024  # bytes of activation records kept per namespace, at most
    memory_check_s: float = 0.25


def annotation(annotations: list, key: str, default: Any = None) -> Any:
    for a in annotations or ():
        if isinstance(a, dict) and a.get("key") == key:
            return a.get("value")
    return default


def kv_list(value: Any, what: str) -> list[dict]:
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
    __slots__ = ("id", "ns", "action", "args", "received", "start", "end", "cold", "prewarmed", "init_ms",
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
        self.prewarmed = False        # its cold start was on a stem cell
        self.init_ms: float | None = None
        self.worker: Worker | None = None
        self.fault = fault
        self.slow_ms = slow_ms
        self.deadline: float | None = None
        self.done = threading.Event()
        self.record: bytes | None = None
        self.status: int | None = None
        self.seq = 0


class Namespace:
    def __init__(self, name: str, settings: Settings):
        self.name = name
        self.actions: dict[str, Action] = {}
        self.concurrent_invocations = settings.concurrent_invocations
        self.invocations_per_minute = settings.invocations_per_minute
        self.faults: FaultPlan | None = None
        self.fault_counters: dict[str, int] = {}
        self.minute: deque[float] = deque()
        self.inflight = 0
        self.records = ActivationRecords(settings)
        self.seq = itertools.count()
        self.counts = {"invocations": 0, "cold_starts": 0, "throttled": 0}
