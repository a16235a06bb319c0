"""A keeper on fakes: an in-memory store with the keeper's Store methods, a
scripted platform, and a clock that moves only when the keeper sleeps. A
whole session runs in milliseconds, without TensorFlow or processes."""
from __future__ import annotations

import itertools
import textwrap
import threading
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Sequence

from fedkeeper.config import load_config
from fedkeeper.providers import ErrorClass, Invocation, Outcome, Provider, ProviderError
from fedkeeper.runtime import Runtime
from fedkeeper.store import OWNER_FIELDS, StoreUnavailable


class FakeClock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        with self._lock:
            self.t += max(dt, 0.001)


class FakeStore:
    """The Store methods the keeper calls, over dicts."""

    where = "127.0.0.1:27017"

    def __init__(self) -> None:
        self.patience_s = 0.0
        self.patience = SimpleNamespace(restart=None)
        self.sessions: dict[str, dict] = {}
        self.rounds_: dict[tuple[str, int], dict] = {}
        self.invocations: dict[Any, dict] = {}
        self.mark_batches: list[dict] = []   # running marks written in batches (insert_running_marks)
        self.events_: list[dict] = []
        self.updates_: dict[tuple[str, int, str], dict] = {}
        self.models: set[tuple[str, int]] = set()
        self.beats: list[float] = []
        self.fail_on: Callable[[str], bool] = lambda method: False
        self._lock = threading.Lock()

    def _check(self, method: str) -> None:
        if self.fail_on(method):
            raise StoreUnavailable(self.where, 60.0, ConnectionError("connection refused"))

    # sessions
    def create_session(self, doc):
        self._check("create_session")
        self.sessions[doc["_id"]] = {"state": "created", **doc}

    def session(self, sid):
        self._check("session")
        return self.sessions.get(sid)

    def update_session(self, sid, **fields):
        self._check("update_session")
        if sid in self.sessions:    # as an update that matches nothing
            self.sessions[sid].update(fields)

    def claim_session(self, sid, seen, me, **fields):
        self._check("claim_session")
        with self._lock:
            doc = self.sessions[sid]
            owner = doc.get("keeper")
            if seen and owner:
                still_seen = all(owner.get(k) == seen.get(k) for k in OWNER_FIELDS)
            else:
                still_seen = not seen and not owner
            if not still_seen:
                # another keeper claimed it since it was checked, unless that
                # is `me` (a claim whose first write landed, its answer lost)
                return self._names(sid, me)
            doc.update(fields, keeper=me)
            return True

    def _names_another(self, sid, keeper) -> bool:
        owner = self.sessions.get(sid, {}).get("keeper")
        return keeper is not None and isinstance(owner, dict) and any(owner.get(k) != keeper.get(k)
                                                                      for k in OWNER_FIELDS)

    def _names(self, sid, keeper) -> bool:
        owner = self.sessions.get(sid, {}).get("keeper")
        return isinstance(owner, dict) and all(owner.get(k) == keeper.get(k) for k in OWNER_FIELDS)

    def heartbeat(self, sid, now=None, timeout_s=5.0, keeper=None):
        self.beats.append(now or 0.0)
        ours = keeper is None or self._names(sid, keeper)
        if ours and sid in self.sessions:
            self.sessions[sid]["heartbeat"] = now
        return True if ours else None

    def end_session(self, sid, keeper, **fields):
        if self._names_another(sid, keeper):
            return False
        self.update_session(sid, **fields)
        return True

    def mark_interrupted(self, sid, timeout_s=2.0, keeper=None, **fields):
        if self.sessions.get(sid, {}).get("state") in ("running", "interrupted") \
                and not self._names_another(sid, keeper):
            self.sessions[sid].update(state="interrupted", **fields)
        return True

    # rounds
    def pause_open_rounds(self, sid, since, now):
        self._check("pause_open_rounds")
        for (s, _), r in self.rounds_.items():
            if s == sid and r.get("state") in ("running", "aggregating"):
                began = max(since, r.get("started", since))
                if now > began:
                    r["paused_s"] = r.get("paused_s", 0.0) + now - began

    def upsert_round(self, sid, rnd, **fields):
        self._check("upsert_round")
        self.rounds_.setdefault((sid, rnd), {"session": sid, "round": rnd}).update(fields)

    def round(self, sid, rnd):
        self._check("round")
        r = self.rounds_.get((sid, rnd))
        return dict(r) if r else None

    def rounds(self, sid):
        self._check("rounds")
        return [dict(v) for (s, _), v in sorted(self.rounds_.items()) if s == sid]

    # attempts
    def insert_attempts(self, docs):
        self._check("insert_attempts")
        with self._lock:
            for d in docs:
                key = (d["session"], d["round"], d["client"], d["attempt"])
                assert all((a["session"], a["round"], a["client"], a["attempt"]) != key
                           for a in self.invocations.values()), f"duplicate attempt {key}"
                self.invocations[d["_id"]] = dict(d)

    def update_attempts(self, changes):
        self._check("update_attempts")
        with self._lock:
            for _id, fields in changes:
                self.invocations[_id].update(fields)

    def attempts(self, sid, rnd=None):
        return sorted((dict(a) for a in self.invocations.values()
                       if a["session"] == sid and (rnd is None or a["round"] == rnd)),
                      key=lambda a: (a["round"], a["client"], a["attempt"]))

    def attempts_by_id(self, ids):
        return {i: dict(self.invocations[i]) for i in ids if i in self.invocations}

    def last_attempt(self, sid, rnd, client):
        return max((a["attempt"] for a in self.invocations.values()
                    if (a["session"], a["round"], a["client"]) == (sid, rnd, client)), default=0)

    def ended_client_attempts(self, sid, ended):
        return [dict(a) for a in self.invocations.values()
                if a["session"] == sid and a["function"] == "fl_client" and a["state"] in ended]

    def insert_running_marks(self, sid, marks):
        self._check("insert_running_marks")
        with self._lock:
            self.mark_batches.append({"session": sid, "marks": [{"attempt": i, **f} for i, f in marks]})

    def fold_running_marks(self, sid):
        self._check("fold_running_marks")
        with self._lock:
            mine = [b for b in self.mark_batches if b["session"] == sid]
            self.mark_batches = [b for b in self.mark_batches if b["session"] != sid]
            n = 0
            for b in mine:
                for m in b["marks"]:
                    a = self.invocations.get(m["attempt"])
                    if a is not None and a["state"] == "submitting":
                        a.update({k: v for k, v in m.items() if k != "attempt"})
                        n += 1
            return n

    def close_unaccepted_attempts(self, sid, why, now):
        self.fold_running_marks(sid)
        n = 0
        with self._lock:
            for a in self.invocations.values():
                if a["session"] == sid and a["state"] == "submitting":
                    if a.get("platform_id"):
                        a["state"] = "running"
                    else:
                        a.update(state="abandoned", error=why, finished=now, unsent=True)
                        n += 1
        return n

    def running_client_attempts(self, sid, before):
        return [dict(a) for a in self.invocations.values() if a["session"] == sid and a["state"] == "running"
                and a["function"] == "fl_client" and a["round"] < before]

    # events
    def event(self, sid, kind, message, **data):
        self._check("event")
        self.events_.append({"session": sid, "kind": kind, "message": message, **data})

    def events(self, sid):
        return [e for e in self.events_ if e["session"] == sid]

    # updates, models
    def add_update(self, sid, rnd, client, attempt=None):
        self.updates_.setdefault((sid, rnd, client), {"status": "received", "attempt": attempt})

    def delivered_clients(self, sid, rnd):
        return {c for (s, r, c) in self.updates_ if (s, r) == (sid, rnd)}

    def storing_attempts(self, sid, rnd, clients):
        return {c: self.updates_[(sid, rnd, c)]["attempt"] for c in clients if (sid, rnd, c) in self.updates_}

    def received_updates(self, sid, lo, hi):
        return [(c, r) for (s, r, c), u in self.updates_.items()
                if s == sid and lo <= r < hi and u["status"] == "received"]

    def count_received_updates(self, sid, lo, hi):
        return len(self.received_updates(sid, lo, hi))

    def mark_updates_stale(self, sid, before):
        for (s, r, _), u in self.updates_.items():
            if s == sid and r < before and u["status"] == "received":
                u["status"] = "stale"

    def model(self, sid, rnd):
        return {"round": rnd} if (sid, rnd) in self.models else None


class FakePlatforms:
    """Dispatch's view of fake clusters (keeper Platforms): each cluster's
    provider, a 128 MB, 60 s spec for every function, and the clusters
    whose clients fl_invoker invokes."""

    def __init__(self, providers: dict[str, Any], via_invoker: Iterable[str] = ()):
        self.providers = providers
        self.through_invoker = set(via_invoker)
        # what the hedger asks of the runtime: every cluster hosts clients
        in_order = SimpleNamespace(clusters=lambda: dict.fromkeys(providers))
        self.rt = SimpleNamespace(client_clusters=lambda: {c: c for c in providers},
                                  cfg=SimpleNamespace(providers=in_order))

    def provider(self, cluster):
        return self.providers[cluster]

    def spec(self, cluster, function):
        return SimpleNamespace(memory_mb=128, timeout_s=60.0)

    def via_invoker(self, cluster):
        return cluster in self.through_invoker

    def payload(self, **ids):
        return ids


class FakeProvider(Provider):
    """A platform whose functions run at once, as `behave` says.

    behave(function, payload, attempt) returns "ok" (fl_client stores its
    update), ("after", seconds) (the same, that much later on the clock),
    ("after", seconds, result) (that result then, nothing stored; an
    Outcome for a failure),
    an Outcome to report, a ProviderError to raise at invoke, or "hang"
    (never finishes)."""

    platform = "fake"
    entry = "openwhisk"
    tracks_foreign_invocations = False

    def __init__(self, name: str, store: FakeStore, clock: FakeClock,
                 behave: Callable[[str, dict, int], Any] | None = None):
        super().__init__(name, None, None)
        self.store, self.clock = store, clock
        self.behave = behave or (lambda fn, payload, n: "ok")
        self.ids = itertools.count(1)
        self.done: dict[str, Outcome] = {}
        self.later: dict[str, tuple[float, str, dict, dict | None]] = {}
        self.invoked: list[tuple[str, dict]] = []
        self.deployed: list[str] = []
        self.track_error: ProviderError | None = None
        self.tracks = 0
        self.restarts = 0
        self.aggregations: list[dict] = []   # the aggregator's payloads, in order
        self.can_restart = False
        self.forgotten: set[str] = set()
        self._lock = threading.Lock()

    def deploy(self, spec, artifact):
        self.deployed.append(spec.name)

    def remove(self, name):
        return True

    def exists(self, name):
        return True

    def invoke(self, name: str, payload: dict) -> Invocation:
        with self._lock:
            self.invoked.append((name, payload))
            n = sum(1 for f, p in self.invoked if f == name and p.get("client") == payload.get("client")
                    and p.get("round") == payload.get("round"))
            pid = f"act-{next(self.ids)}"
        what = self.behave(name, payload, n)
        if isinstance(what, ProviderError):
            raise what
        if what == "ok":
            result = self._run(name, payload)
            self.done[pid] = Outcome(pid, True, result=result, duration_ms=10.0, cold_start=False)
        elif isinstance(what, tuple) and what[0] == "after":
            self.later[pid] = (self.clock() + what[1], name, payload, what[2] if len(what) > 2 else None)
        elif isinstance(what, Outcome):
            self.done[pid] = Outcome(pid, what.ok, what.error_class, what.error, what.result,
                                     retry_after=what.retry_after)
        return Invocation(name, pid, self.clock())

    def _run(self, name: str, p: dict) -> dict:
        sid, rnd = p["session"], p["round"]
        if name == "fl_client":
            self.store.add_update(sid, rnd, p["client"], p.get("attempt"))
            return {"num_examples": 10}
        if name == "fl_server_init":
            self.store.models.add((sid, 0))
            return {"ok": True}
        if name == "fl_server_aggregator":
            self.aggregations.append(dict(p))
            if p.get("mark_counted"):   # as the real one: only when asked
                for c in p.get("clients", []):
                    self.store.updates_[(sid, rnd, c)]["status"] = "accepted"
                for u in p.get("stale", []):
                    self.store.updates_[(sid, u["round"], u["client"])]["status"] = "accepted"
            self.store.models.add((sid, rnd + 1))
            return {"accuracy": 0.5 + 0.01 * rnd, "loss": 1.0, "accepted": len(p.get("clients", []))}
        return {}

    def track(self, pending: Sequence[Invocation]) -> list[Outcome]:
        self.tracks += 1
        if self.track_error is not None:
            raise self.track_error
        for pid, (at, name, payload, result) in list(self.later.items()):
            if at <= self.clock():
                del self.later[pid]
                if isinstance(result, Outcome):
                    self.done[pid] = Outcome(pid, result.ok, result.error_class, result.error, result.result)
                    continue
                self.done[pid] = Outcome(pid, True, result=self._run(name, payload) if result is None else result,
                                         duration_ms=10.0)
        return [self.done.pop(i.platform_id) for i in pending if i.platform_id in self.done]

    def call(self, name, payload, timeout_s, poll_s=0.05):
        inv = self.invoke(name, payload)
        out = self.done.pop(inv.platform_id, None)
        return out or Outcome(inv.platform_id, False, ErrorClass.TIMEOUT, "no outcome")

    def restart_local_service(self) -> bool:
        if not self.can_restart:
            return False
        self.restarts += 1
        self.track_error = None
        return True

    def lost_invocations(self, pending):
        return [i.platform_id for i in pending if i.platform_id in self.forgotten]


def fake_config(tmp_path, *, mode: str = "sync", rounds: int = 2, clients: int = 4, per_round: int = 4,
                extra_cluster: str = "", training: str = "", deadline_s: float = 60,
                fast_first_retry: bool = True, fast_while_delivering: bool = True,
                second_cluster: int = 0) -> Any:
    """`second_cluster`: that many of the clients on a second cluster, c2."""
    path = tmp_path / "fake.yaml"
    c2 = "\n            c2: {kind: local}" if second_cluster else ""
    split = f"c1: {clients - second_cluster}, c2: {second_cluster}" if second_cluster else f"c1: {clients}"
    path.write_text(textwrap.dedent(f"""\
        name: fake
        providers:
          openwhisk:
            c1: {{kind: local{extra_cluster}}}{c2}
        scenarios:
          federated_learning:
            clients_info:
              total_num_clients: {clients}
              num_clients_per_round: {per_round}
              clusters: {{{split}}}
            mongo_config: {{url: "mongodb://127.0.0.1:1", db: fake}}
            training:
              rounds: {rounds}
              mode: {mode}
              quorum: 0.5
              round_deadline_s: {deadline_s}
              attempt_grace_s: 5
              retries: {{max_attempts: 3, backoff_s: 0.5, backoff_max_s: 4, jitter: 0.0,
                        fast_first_retry: {str(fast_first_retry).lower()},
                        fast_while_delivering: {str(fast_while_delivering).lower()}}}
        """) + textwrap.indent(textwrap.dedent(training), " " * 6))
    return load_config(path)


def fake_keeper(tmp_path, behave=None, *, second=None, **cfg_kw):
    """(keeper, store, provider, clock) for a config of one fake cluster;
    with `second` (the behaviour of a second cluster, c2, holding
    cfg_kw["second_cluster"] of the clients), its provider is
    keeper.rt.providers["c2"]."""
    from fedkeeper.keeper import Keeper
    cfg = fake_config(tmp_path, **cfg_kw)
    rt = Runtime.open(cfg, need_store=False)
    store, clock = FakeStore(), FakeClock()
    rt.store = store
    provider = FakeProvider("c1", store, clock, behave)
    rt.providers["c1"] = provider
    if cfg_kw.get("second_cluster"):
        rt.providers["c2"] = FakeProvider("c2", store, clock, second)
    rt.deploy = lambda placements, on_done=None, max_workers=8: [
        (pl, rt.providers[pl.cluster].deploy(pl.spec, None), None) for pl in placements]
    keeper = Keeper(rt, clock=clock, sleep=clock.sleep)
    return keeper, store, provider, clock
