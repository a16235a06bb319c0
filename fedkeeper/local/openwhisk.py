"""OpenWhisk clusters of `kind: local`: the embedded fabric, driven by the very
same provider code as a remote controller.

The fabric of a state directory is shared by every local OpenWhisk cluster
of a config; each cluster is its own namespace in it (the cluster's
`namespace`, else its name), so their actions, activations, limits and
injected faults stay apart. Every provider holds a lease on the fabric while
it is open: a fabric started by a command stops when its last holder closes
(two commands on one state directory never stop each other's fabric),
unless local services are kept; one started with `fedkeeper fabric up` is
reused and left running.
"""
from __future__ import annotations

import atexit
import json
import logging
import re
import threading
from pathlib import Path
from typing import Any, Callable

import requests

from ..providers.base import ErrorClass, ProviderContext, ProviderError
from ..providers.openwhisk.provider import OpenWhiskProvider
from ..providers.prometheus import ClusterMetrics, prometheus_url
from . import fabric

log = logging.getLogger("fedkeeper.local")

# Leases taken by `prewarm` ahead of a command's providers, per fabric
# directory: each is given back once a provider of that fabric holds its own
# (so the fabric is not stopped in between), or when the process exits.
_early_leases: dict[Path, list] = {}
_early_lock = threading.Lock()


def _take_early_leases(fabric_dir: Path) -> list:
    with _early_lock:
        return _early_leases.pop(fabric_dir.resolve(), [])


@atexit.register
def _release_early_leases() -> None:
    with _early_lock:
        left = list(_early_leases.items())
        _early_leases.clear()
    for fabric_dir, leases in left:
        for lease in leases:
            fabric.fabric_release(fabric_dir, lease)


def _capacity_of_cluster(cluster: Any) -> dict:
    memory = getattr(cluster, "user_memory_mb", None)
    stems = getattr(cluster, "stem_cells", None)
    return {"userMemoryMb": int(memory) if memory is not None else None,
            "stemCells": {str(k): int(v) for k, v in dict(stems).items()} if stems is not None else None}


def _capacity_body(cluster: Any, siblings: dict[str, tuple[str, Any]]) -> dict:
    """The fabric's capacity a local cluster's config implies, as the
    fabric's limits body: its `user_memory_mb` and `stem_cells`; for either
    it leaves out, what another local OpenWhisk cluster of the same config
    sets (they share the fabric: one's silence must not undo the other's
    setting), else null, which the fabric reads as the setting it was
    started with (OpenWhisk's 2048 MB and one TensorFlow stem cell, unless
    its command line says otherwise). Both are always sent: a key left out
    would keep whatever an earlier command's config set."""
    body = _capacity_of_cluster(cluster)
    for section, other in siblings.values():
        if section == "openwhisk" and getattr(other, "kind", "remote") == "local" and other is not cluster:
            for k, v in _capacity_of_cluster(other).items():
                if body[k] is None:
                    body[k] = v
    return body


def _capacity_of(info: dict | None) -> tuple:
    return (info or {}).get("user_memory_mb"), (info or {}).get("stem_cells")


def _push_capacity(put: Callable[[dict], Any], fabric_dir: Path, before: dict, cluster_name: str,
                   cluster: Any, siblings: dict[str, tuple[str, Any]]) -> None:
    """Set the fabric's capacity to what the cluster's config implies.
    `before`: the fabric's info before (from fabric_up). The fabric is one
    per state directory, shared by every command on it: the latest
    command's config wins, also for the commands still running on it, which
    is logged when it changes what a fabric this call did not start had."""
    put(_capacity_body(cluster, siblings))
    if before.get("started"):
        return   # it had only its start settings, which no command chose
    was, now = _capacity_of(before), _capacity_of(fabric.fabric_status(fabric_dir))
    if None not in was and None not in now and was != now:
        log.warning("cluster %s: the local fabric's user memory and stem cells were %s MB and %s, now %s MB "
                    "and %s as this command's config implies; the fabric is shared by the commands of this "
                    "state directory and the latest one's config wins, for those still running too",
                    cluster_name, was[0], was[1], now[0], now[1])


def _namespace_for(cluster_name: str) -> str:
    ns = re.sub(r"[^A-Za-z0-9_.@-]", "_", cluster_name).lstrip(".-@") or "guest"
    return ns[:200]


class LocalOpenWhiskProvider(OpenWhiskProvider):
    # Priced like the platform it stands in for, so that a sweep on the
    # local fabric estimates what the same run would cost there.
    default_prices = OpenWhiskProvider.default_prices

    @classmethod
    def metrics_namespace(cls, cluster_name: str, cluster: Any) -> str | None:
        # the fabric's namespace of this cluster (the one its metrics carry)
        return getattr(cluster, "namespace", None) or _namespace_for(cluster_name)

    @classmethod
    def cluster_metrics(cls, cluster_name: str, cluster: Any, window: str | None, actions,
                        timeout_s: float = 10.0) -> ClusterMetrics:
        """As a remote cluster's, from the Prometheus its config names. A
        local cluster needs none to run, so without one the row is a note
        on how to get its figures, not an error (the README's own local
        config names none)."""
        if prometheus_url(getattr(cluster, "prometheus_config", None)) is None:
            return ClusterMetrics(
                cluster=cluster_name, prometheus=None, namespace=cls.metrics_namespace(cluster_name, cluster),
                window=window, note="no Prometheus configured: the local fabric serves OpenWhisk's user-event "
                                    "metrics at its /metrics (`fedkeeper fabric status` gives its URL) for one to "
                                    "scrape; name that one in prometheus_config.url")
        return super().cluster_metrics(cluster_name, cluster, window, actions, timeout_s)

    def __init__(self, cluster_name: str, cluster: Any, ctx: ProviderContext):
        # Not OpenWhiskProvider.__init__: there is no remote endpoint or key
        # in the config; the fabric's own come from its state directory.
        super(OpenWhiskProvider, self).__init__(cluster_name, cluster, ctx)
        self.fabric_dir = Path(ctx.state_dir) / "fabric"
        try:
            info = fabric.fabric_up(self.fabric_dir, hold=True, auto_stop=not ctx.keep_local_services)
        except (fabric.FabricError, OSError) as exc:
            raise ProviderError(ErrorClass.UNREACHABLE,
                                f"cluster {cluster_name}: the local fabric did not start: {exc}") from None
        self.started_fabric = bool(info.get("started"))
        self._lease = info.get("lease")
        # Activations submitted before this fabric started are unknown to it.
        self.fabric_started_at = float(info.get("started_at") or 0.0)
        user, _, key = info["auth"].partition(":")
        ns = getattr(cluster, "namespace", None) or _namespace_for(cluster_name)
        # Same host, same clock: the activation window needs no skew margin.
        self._connect(info["url"], (user, key), ns, verify=True, clock_offset=0.0)
        self.push_faults()
        self.push_capacity(info)
        # this provider's lease holds the fabric now: those taken ahead of it can go
        for lease in _take_early_leases(self.fabric_dir):
            fabric.fabric_release(self.fabric_dir, lease)

    @classmethod
    def prewarm(cls, cluster_name: str, cluster: Any, ctx: ProviderContext, runtimes: list[str]) -> None:
        """Ahead of a command's deploy (fedkeeper/local/prewarm.py): start the
        fabric and the zygotes of the runtimes about to be deployed, so that
        TensorFlow loads while the keeper still starts its store and packages
        the functions. Holds a lease on the fabric until this process's
        provider of it holds its own."""
        fabric_dir = Path(ctx.state_dir) / "fabric"
        info = fabric.fabric_up(fabric_dir, hold=True, auto_stop=not ctx.keep_local_services)
        with _early_lock:
            _early_leases.setdefault(fabric_dir.resolve(), []).append(info.get("lease"))
        with requests.Session() as s:
            s.auth = tuple(info["auth"].split(":", 1))
            params = {"namespace": getattr(cluster, "namespace", None) or _namespace_for(cluster_name)}
            # the cluster's own stem cells decide which runtimes get a zygote
            _push_capacity(lambda body: s.put(f"{info['url']}/_fabric/limits", params=params,
                                              data=json.dumps(body).encode(), timeout=10).raise_for_status(),
                           fabric_dir, info, cluster_name, cluster, ctx.clusters)
            s.put(f"{info['url']}/_fabric/prewarm", data=json.dumps({"runtimes": runtimes}).encode(),
                  timeout=10).raise_for_status()

    def push_capacity(self, info: dict | None = None) -> None:
        """The fabric's user memory and stem cells per runtime: what the
        cluster's config sets (`user_memory_mb`, `stem_cells`), else the
        fabric's own (OpenWhisk's 2048 MB, one TensorFlow stem cell). The
        fabric is shared by the local clusters of a state directory: what
        one of the config's leaves out comes from another that sets it, and
        the last command connected sets them. `info`: the fabric's from
        fabric_up, if at hand."""
        before = info if info is not None else fabric.fabric_status(self.fabric_dir)
        _push_capacity(lambda body: self.fabric_admin("limits", body), self.fabric_dir, before or {},
                       self.cluster_name, self.cluster, self.ctx.clusters)

    def push_faults(self) -> None:
        """Send the cluster's fault injection settings to the fabric (none
        clears them); the fabric's fault sequence restarts from its seed."""
        faults = getattr(self.cluster, "faults", None)
        body = faults.plan().to_json() if faults is not None else {}
        r = self._session.put(f"{self.api_host}/_fabric/faults", params={"namespace": self.namespace},
                              data=json.dumps(body).encode(), timeout=10)
        if r.status_code != 200:
            raise self._status_error(r.status_code, r.content, "configuring fault injection", r.headers)

    def fabric_admin(self, what: str, body: dict | None = None) -> dict:
        """GET (body None) or PUT one of the fabric's admin resources for this
        cluster's namespace: "faults", "limits" or "status"."""
        url = f"{self.api_host}/_fabric/{what}"
        params = {"namespace": self.namespace}
        if body is None:
            r = self._session.get(url, params=params, timeout=10)
        else:
            r = self._session.put(url, params=params, data=json.dumps(body).encode(), timeout=10)
        if r.status_code != 200:
            raise self._status_error(r.status_code, r.content, f"fabric {what}", r.headers)
        return r.json()

    def restart_local_service(self) -> bool:
        """Start the fabric again after it stopped answering (a new fabric
        drops the dead one's leases) and reconnect; the keeper redeploys the
        actions it finds missing and invokes lost activations again."""
        try:
            info = fabric.fabric_up(self.fabric_dir, hold=True, auto_stop=not self.ctx.keep_local_services)
        except (fabric.FabricError, OSError):
            return False
        # The old lease went with a dead fabric; on a live one the new lease holds it.
        old, self._lease = self._lease, info.get("lease")
        fabric.fabric_release(self.fabric_dir, old)
        self.started_fabric = self.started_fabric or bool(info.get("started"))
        self.fabric_started_at = float(info.get("started_at") or 0.0)
        user, _, key = info["auth"].partition(":")
        self._session.close()
        self._pool.close()
        self._connect(info["url"], (user, key), self.namespace, verify=True, clock_offset=0.0)
        self.push_faults()
        self.push_capacity(info)
        # Only a fabric started now has lost what ran before (a slow one
        # that still answers was reconnected to, not restarted).
        return bool(info.get("started"))

    def lost_invocations(self, pending):
        return [inv.platform_id for inv in pending if inv.submitted_at < self.fabric_started_at]

    def close(self) -> None:
        super().close()
        lease, self._lease = self._lease, None
        fabric.fabric_release(self.fabric_dir, lease)
