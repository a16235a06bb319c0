"""What a Kubernetes cluster offers, read with the official client: nodes,
CPU, memory, GPUs, and the ready pods of the platforms deployed on it
(OpenWhisk invokers, Knative activators). `fedkeeper cluster info` and
`fedkeeper check` fill FedKeeper's per-cluster `configurations` block
(num_hosts, each_host_cores, each_host_ram, gpu_enabled) from it and warn
where the config says otherwise.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any, Mapping

from ...config.values import shown_url
from .client import REQUEST_TIMEOUT, api_client, map_api_error

GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")
#: labels NVIDIA's GPU feature discovery / GKE put on GPU nodes
GPU_LABELS = ("nvidia.com/gpu.present", "nvidia.com/gpu.product", "nvidia.com/gpu.count",
              "cloud.google.com/gke-accelerator", "feature.node.kubernetes.io/pci-10de.present")
#: openwhisk-deploy-kube labels the nodes that may run invokers (and so
#: action containers) with this; when present, only those nodes are hosts
OPENWHISK_INVOKER_NODE_LABEL = ("openwhisk-role", "invoker")
KNATIVE_NAMESPACE = "knative-serving"
KNATIVE_ACTIVATOR_SELECTOR = "app=activator"
CONTROL_PLANE_TAINTS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")
CONFIG_KEYS = ("num_hosts", "each_host_cores", "each_host_ram", "gpu_enabled")


# ------------------------------------------------------------------ figures

def parse_quantity(value: Any) -> Decimal:
    """A Kubernetes quantity ("3800m", "16331524Ki", "8Gi", "1e9") as a number."""
    from kubernetes.utils import parse_quantity as _pq
    return _pq(value if value is not None else "0")


def format_ram(nbytes: int | Decimal) -> str:
    """Bytes in FedKeeper's `each_host_ram` style ("128gb"); the unit is GiB,
    rounded to the nearest whole GiB (memory is never an exact number)."""
    gib = Decimal(nbytes) / Decimal(2 ** 30)
    if gib >= 1:
        return f"{int(gib.to_integral_value())}gb"
    return f"{int((Decimal(nbytes) / Decimal(2 ** 20)).to_integral_value())}mb"


def parse_ram(text: Any) -> int | None:
    """`each_host_ram` as written in configs ("128gb", "128GB", "64Gi", "512mb") -> bytes."""
    if text is None or text == "":
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]i?b?|[kmgt]b)?\s*", str(text), re.I)
    if not m:
        return None
    unit = (m.group(2) or "gb").lower()[0]
    return int(float(m.group(1)) * {"k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}[unit])


def _cores(q: Decimal) -> int | float:
    return int(q) if q == q.to_integral_value() else float(q)


def _node_ready(node) -> bool:
    for c in (node.status.conditions or []) if node.status else []:
        if c.type == "Ready":
            return c.status == "True"
    return False


def _pod_ready(pod) -> bool:
    if not pod.status or pod.status.phase != "Running":
        return False
    for c in pod.status.conditions or []:
        if c.type == "Ready":
            return c.status == "True"
    return False


def node_summary(node) -> dict[str, Any]:
    labels = dict(node.metadata.labels or {})
    cap = dict(node.status.capacity or {}) if node.status else {}
    alloc = dict(node.status.allocatable or {}) if node.status else {}
    taints = [t for t in (node.spec.taints or [])] if node.spec else []
    gpus = 0
    for res in GPU_RESOURCES:
        gpus += int(parse_quantity(cap.get(res, "0")))
    gpu_labels = {k: v for k, v in labels.items() if k in GPU_LABELS}
    no_schedule = [t.key for t in taints if t.effect in ("NoSchedule", "NoExecute")]
    return {
        "name": node.metadata.name,
        "ready": _node_ready(node),
        "schedulable": not (node.spec and node.spec.unschedulable),
        "control_plane": any(k in labels or k in no_schedule for k in CONTROL_PLANE_TAINTS),
        "no_schedule_taints": no_schedule,
        "cpu_capacity": _cores(parse_quantity(cap.get("cpu", "0"))),
        "cpu_allocatable": _cores(parse_quantity(alloc.get("cpu", cap.get("cpu", "0")))),
        "memory_capacity": int(parse_quantity(cap.get("memory", "0"))),
        "memory_allocatable": int(parse_quantity(alloc.get("memory", cap.get("memory", "0")))),
        "gpus": gpus,
        "gpu_labels": gpu_labels,
        "gpu": gpus > 0 or labels.get("nvidia.com/gpu.present") == "true"
        or "cloud.google.com/gke-accelerator" in labels,
        "openwhisk_invoker_node": labels.get(OPENWHISK_INVOKER_NODE_LABEL[0])
        == OPENWHISK_INVOKER_NODE_LABEL[1],
        "arch": labels.get("kubernetes.io/arch"),
    }


def _is_invoker_pod(pod) -> bool:
    """openwhisk-deploy-kube names its invoker StatefulSet `<release>-invoker`
    and labels the pods `name: <release>-invoker`; other charts use
    `app: invoker` or `app.kubernetes.io/component: invoker`."""
    labels = dict(pod.metadata.labels or {})
    name = labels.get("name", "")
    return (name == "invoker" or name.endswith("-invoker")
            or labels.get("app") == "invoker"
            or labels.get("app.kubernetes.io/component") == "invoker")


def _pod_summary(pod) -> dict[str, Any]:
    return {"name": pod.metadata.name, "namespace": pod.metadata.namespace,
            "node": pod.spec.node_name if pod.spec else None, "ready": _pod_ready(pod),
            "phase": pod.status.phase if pod.status else None}


# ------------------------------------------------------------------ info

def cluster_info(cluster: Any, *, api=None, configured: Any = None) -> dict[str, Any]:
    """What the cluster offers, as a JSON-able dict.

    `cluster` is a cluster config section (any section: OpenWhisk deployed
    on Kubernetes has kubeconfig/context too); `api` an existing ApiClient
    (tests, or a caller that already has one). `configured` defaults to the
    section's `configurations` block; the figures are compared with it and
    every difference becomes a line in `warnings`.

    Keys: nodes, hosts (names of the nodes counted as hosts and why),
    configurations (num_hosts, each_host_cores, each_host_ram, gpu_enabled
    as FedKeeper writes them), openwhisk {invokers, invokers_ready, pods},
    knative {activators, activators_ready}, warnings.
    """
    from kubernetes import client

    own = api is None
    api = api or api_client(cluster)
    try:
        core = client.CoreV1Api(api)
        try:
            nodes = core.list_node(_request_timeout=REQUEST_TIMEOUT).items or []
        except Exception as exc:
            raise map_api_error(exc, "list nodes") from None
        try:
            pods = core.list_pod_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT).items or []
        except Exception as exc:
            # listing pods cluster-wide needs more rights than listing nodes;
            # the node figures are still worth having
            pods = None
            pod_error = map_api_error(exc, "list pods")
        else:
            pod_error = None
        try:
            activators = core.list_namespaced_pod(
                KNATIVE_NAMESPACE, label_selector=KNATIVE_ACTIVATOR_SELECTOR,
                _request_timeout=REQUEST_TIMEOUT).items or []
        except Exception:
            activators = [p for p in (pods or []) if p.metadata.namespace == KNATIVE_NAMESPACE
                          and (p.metadata.labels or {}).get("app") == "activator"]
    finally:
        if own:
            api.close()

    summaries = [node_summary(n) for n in nodes]
    # shown, never with the user info a kubeconfig may have written into it
    info: dict[str, Any] = {"api_server": shown_url(api.configuration.host or ""), "nodes": summaries}
    hosts, basis = _hosts(summaries)
    info["hosts"] = {"names": [h["name"] for h in hosts], "basis": basis}
    warnings: list[str] = []
    figures: dict[str, Any] = {"num_hosts": len(hosts), "each_host_cores": None,
                               "each_host_ram": None, "gpu_enabled": any(h["gpu"] for h in hosts)}
    if hosts:
        cores = [h["cpu_capacity"] for h in hosts]
        mem = [h["memory_capacity"] for h in hosts]
        # FedKeeper describes identical hosts; on a mixed cluster the
        # smallest host is the one a placement must fit on
        figures["each_host_cores"] = min(cores)
        figures["each_host_ram"] = format_ram(min(mem))
        if len(set(cores)) > 1 or len({format_ram(m) for m in mem}) > 1:
            warnings.append("hosts differ in size; each_host_cores/each_host_ram give the "
                            "smallest host")
    else:
        warnings.append("no ready, schedulable node found to count as a host")
    info["configurations"] = figures

    invokers = [p for p in (pods or []) if _is_invoker_pod(p)]
    info["openwhisk"] = {"invokers": len(invokers),
                         "invokers_ready": sum(1 for p in invokers if _pod_ready(p)),
                         "pods": [_pod_summary(p) for p in invokers]}
    info["knative"] = {"activators": len(activators),
                       "activators_ready": sum(1 for p in activators if _pod_ready(p)),
                       "pods": [_pod_summary(p) for p in activators]}
    if pod_error is not None:
        warnings.append(f"pods not inspected ({pod_error})")
    if invokers and info["openwhisk"]["invokers_ready"] < len(invokers):
        warnings.append(f"only {info['openwhisk']['invokers_ready']} of {len(invokers)} "
                        "OpenWhisk invoker pods are ready")
    if activators and info["knative"]["activators_ready"] == 0:
        warnings.append("no Knative activator pod is ready (scale-from-zero will fail)")

    if configured is None:
        configured = getattr(cluster, "configurations", None)
    warnings.extend(compare_configurations(configured, figures))
    info["warnings"] = warnings
    return info


def kube_clusters(cfg: Any) -> dict[str, Any]:
    """Clusters of a loaded Config that can be introspected: every Knative
    cluster, and any other with kubeconfig, context, api_server or
    in_cluster set (e.g. OpenWhisk deployed on Kubernetes)."""
    out: dict[str, Any] = {}
    for name, (section, c) in cfg.providers.clusters().items():
        if getattr(type(c), "on_kubernetes", False) or any(getattr(c, k, None) for k in
                                       ("kubeconfig", "context", "api_server", "in_cluster")):
            out[name] = c
    return out


def _hosts(nodes: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    usable = [n for n in nodes if n["ready"] and n["schedulable"]]
    invoker_nodes = [n for n in usable if n["openwhisk_invoker_node"]]
    if invoker_nodes:
        return invoker_nodes, "nodes labelled openwhisk-role=invoker"
    workers = [n for n in usable if not n["no_schedule_taints"]]
    if workers:
        return workers, "ready, schedulable nodes without NoSchedule taints"
    return usable, "ready, schedulable nodes"


def compare_configurations(configured: Any, figures: Mapping[str, Any]) -> list[str]:
    """One warning per configured figure that the cluster contradicts."""
    if configured is None:
        return []
    get = (configured.get if isinstance(configured, Mapping)
           else lambda k, d=None: getattr(configured, k, d))
    out: list[str] = []
    n = get("num_hosts")
    if n not in (None, "") and figures.get("num_hosts") is not None:
        try:
            if int(n) != int(figures["num_hosts"]):
                out.append(f"num_hosts is {n} in the config, the cluster has "
                           f"{figures['num_hosts']}")
        except (TypeError, ValueError):
            out.append(f"num_hosts {n!r} in the config is not a number")
    c = get("each_host_cores")
    if c not in (None, "") and figures.get("each_host_cores") is not None:
        try:
            if not math.isclose(float(c), float(figures["each_host_cores"]), rel_tol=1e-6):
                out.append(f"each_host_cores is {c} in the config, the cluster's hosts have "
                           f"{figures['each_host_cores']}")
        except (TypeError, ValueError):
            out.append(f"each_host_cores {c!r} in the config is not a number")
    r = get("each_host_ram")
    if r not in (None, "") and figures.get("each_host_ram") is not None:
        want, have = parse_ram(r), parse_ram(figures["each_host_ram"])
        if want is None:
            out.append(f"each_host_ram {r!r} in the config is not a memory size")
        elif have and abs(want - have) > 0.1 * have:
            # 10 %: "128gb" hosts report 125.8 GiB after firmware/kernel reservations
            out.append(f"each_host_ram is {r} in the config, the cluster's hosts have "
                       f"{figures['each_host_ram']}")
    g = get("gpu_enabled")
    if g is not None and bool(g) != bool(figures.get("gpu_enabled")):
        out.append(f"gpu_enabled is {str(bool(g)).lower()} in the config, the cluster "
                   f"{'has' if figures.get('gpu_enabled') else 'has no'} GPU nodes")
    return out



def format_info(info: Mapping[str, Any]) -> str:
    """A human summary for the CLI."""
    lines = [f"API server: {info.get('api_server')}"]
    for n in info.get("nodes", []):
        flags = []
        if not n["ready"]:
            flags.append("not ready")
        if not n["schedulable"]:
            flags.append("cordoned")
        if n["control_plane"]:
            flags.append("control plane")
        gpu = f", {n['gpus']} GPU" if n["gpus"] else (", GPU label" if n["gpu"] else "")
        lines.append(f"  node {n['name']}: {n['cpu_capacity']} cores "
                     f"({n['cpu_allocatable']} allocatable), {format_ram(n['memory_capacity'])} "
                     f"({format_ram(n['memory_allocatable'])} allocatable){gpu}"
                     + (f" [{', '.join(flags)}]" if flags else ""))
    h = info.get("hosts", {})
    lines.append(f"hosts: {len(h.get('names', []))} ({h.get('basis')})")
    ow, kn = info.get("openwhisk", {}), info.get("knative", {})
    lines.append(f"OpenWhisk invokers ready: {ow.get('invokers_ready', 0)}/{ow.get('invokers', 0)}")
    lines.append(f"Knative activators ready: {kn.get('activators_ready', 0)}/{kn.get('activators', 0)}")
    lines.append("configurations:")
    for k in CONFIG_KEYS:
        lines.append(f"  {k}: {info.get('configurations', {}).get(k)}")
    for w in info.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)
