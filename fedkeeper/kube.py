"""Kubernetes access and cluster introspection through the official client.

Two users: the Knative provider (which needs an authenticated `ApiClient`
and classified API errors) and `fedkeeper cluster info`, which reads what
the cluster really offers — nodes, CPU, memory, GPUs, ready OpenWhisk
invoker and Knative activator pods — and fills FedKeeper's per-cluster
`configurations` block (num_hosts, each_host_cores, each_host_ram,
gpu_enabled) from it, warning where the config says otherwise.

Connection settings are read from the cluster's config section:
  api_server   plain base URL, no credentials (`kubectl proxy`, tests)
  in_cluster   the pod's service account (the keeper runs in the cluster)
  kubeconfig   a kubeconfig file (default: $KUBECONFIG or ~/.kube/config)
  context      a context in that file (default: its current context)

`write_configurations` edits the YAML file in place without a YAML
round-trip: PyYAML would drop every comment and reorder nothing but lose
`${ENV}` layout, and ruamel.yaml is not a dependency. It locates the
`configurations` mapping of the named cluster through PyYAML's node marks,
rewrites only the four value spans (or inserts the missing lines with the
siblings' indentation), re-parses the result and checks that nothing but
those four keys changed before replacing the file atomically.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping

import yaml

from .providers.base import ErrorClass, ProviderError

#: (connect, read) seconds for every control-plane call: a dead API server
#: must fail in seconds, not in the client's default of "forever"
REQUEST_TIMEOUT = (5.0, 30.0)

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


# ------------------------------------------------------------------ client

def api_client(cluster: Any):
    """An authenticated `kubernetes.client.ApiClient` for a cluster section.

    Raises ProviderError(AUTH) when no usable credentials are found, so
    that the CLI can print one line instead of a traceback.
    """
    from kubernetes import client, config as kconfig

    conf = client.Configuration()
    api_server = getattr(cluster, "api_server", None)
    try:
        if api_server:
            conf.host = str(api_server).rstrip("/")
        elif getattr(cluster, "in_cluster", False):
            kconfig.load_incluster_config(client_configuration=conf)
        else:
            path = getattr(cluster, "kubeconfig", None)
            kconfig.load_kube_config(
                config_file=str(Path(path).expanduser()) if path else None,
                context=getattr(cluster, "context", None) or None,
                client_configuration=conf, persist_config=False)
    except (kconfig.ConfigException, OSError, TypeError, ValueError) as exc:
        # the message names the file/context, never a token
        raise ProviderError(ErrorClass.AUTH, f"cannot load Kubernetes credentials: {exc}") from None
    # one retry on connection errors only; the callers bound everything else
    conf.retries = 1
    return client.ApiClient(conf)


def api_message(exc: Exception) -> str:
    """The API server's own message from an ApiException body (a Status)."""
    body = getattr(exc, "body", None)
    if body:
        try:
            status = json.loads(body)
            if isinstance(status, dict) and status.get("message"):
                return str(status["message"])[:400]
        except (ValueError, TypeError):
            pass
    return str(getattr(exc, "reason", None) or exc)[:400]


def map_api_error(exc: BaseException, what: str) -> ProviderError:
    """A Kubernetes control-plane failure as a classified ProviderError."""
    if isinstance(exc, ProviderError):
        return exc
    from kubernetes.client.exceptions import ApiException
    import urllib3.exceptions as u3

    if isinstance(exc, ApiException):
        status = exc.status or 0
        msg = f"{what}: HTTP {status}: {api_message(exc)}"
        if status in (401, 403):
            return ProviderError(ErrorClass.AUTH, msg, status=status)
        if status == 404:
            return ProviderError(ErrorClass.FUNCTION_MISSING, msg, status=status)
        if status == 413:
            return ProviderError(ErrorClass.PAYLOAD_TOO_LARGE, msg, status=status)
        if status == 429:
            from .providers.http_invoke import retry_after_seconds
            headers = exc.headers or {}
            return ProviderError(ErrorClass.THROTTLED, msg, status=status,
                                 retry_after=retry_after_seconds(headers.get("Retry-After")))
        if status == 504:
            return ProviderError(ErrorClass.TIMEOUT, msg, status=status)
        if status == 0:
            return ProviderError(ErrorClass.UNREACHABLE, msg)
        return ProviderError(ErrorClass.PLATFORM_ERROR, msg, status=status)
    if isinstance(exc, (u3.ReadTimeoutError, TimeoutError)):
        return ProviderError(ErrorClass.TIMEOUT, f"{what}: the API server did not answer in time")
    if isinstance(exc, (u3.MaxRetryError, u3.NewConnectionError, u3.ProtocolError,
                        ConnectionError, u3.SSLError)):
        reason = getattr(exc, "reason", None) or exc
        return ProviderError(ErrorClass.UNREACHABLE, f"{what}: API server unreachable: {reason}")
    return ProviderError(ErrorClass.PLATFORM_ERROR, f"{what}: {type(exc).__name__}: {exc}")


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
    info: dict[str, Any] = {"api_server": api.configuration.host, "nodes": summaries}
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


# ------------------------------------------------------------------ write-config

class ConfigEditError(ValueError):
    """The config file cannot be edited safely (cluster not found, odd layout)."""


def _scalar_text(key: str, value: Any, old: yaml.Node | None) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    # keep the operator's quoting: FedKeeper's sample writes each_host_cores: "32"
    if isinstance(old, yaml.ScalarNode) and old.style in ('"', "'"):
        return json.dumps(text)
    return text


def _find_cluster(root: yaml.Node, cluster_name: str) -> yaml.MappingNode:
    if not isinstance(root, yaml.MappingNode):
        raise ConfigEditError("the config's top level is not a mapping")
    providers = next((v for k, v in root.value if k.value == "providers"), None)
    if not isinstance(providers, yaml.MappingNode):
        raise ConfigEditError("the config has no providers mapping")
    for _section_key, section in providers.value:
        if not isinstance(section, yaml.MappingNode):
            continue
        for k, v in section.value:
            if k.value == cluster_name:
                if not isinstance(v, yaml.MappingNode) or v.flow_style:
                    raise ConfigEditError(f"cluster {cluster_name} is not a block mapping")
                return v
    raise ConfigEditError(f"no cluster named {cluster_name!r} under providers")


def _append_lines(text: str, last: yaml.Node, lines: list[str]) -> tuple[int, int, str]:
    """An insertion of `lines` right after the node `last` (the last value
    of a block mapping). A scalar ends inside its line (a comment may
    follow): insert after that line's end. A block collection's end mark
    already sits at the start of the following line: insert there."""
    pos = last.end_mark.index
    if pos > 0 and text[pos - 1] == "\n":
        return pos, pos, "".join(line + "\n" for line in lines)
    eol = text.find("\n", pos)
    if eol < 0:
        return len(text), len(text), "".join("\n" + line for line in lines)
    return eol, eol, "".join("\n" + line for line in lines)


def edit_configurations(text: str, cluster_name: str, values: Mapping[str, Any]) -> str:
    """`text` with providers.<section>.<cluster_name>.configurations.<key>
    set to `values` (only CONFIG_KEYS); everything else byte for byte."""
    values = {k: v for k, v in values.items() if k in CONFIG_KEYS and v is not None}
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    cluster = _find_cluster(root, cluster_name)
    conf = next(((k, v) for k, v in cluster.value if k.value == "configurations"), None)
    edits: list[tuple[int, int, str]] = []   # (start, end, replacement), non-overlapping
    if conf is None:
        # a new block after the cluster's last key, indented like its keys
        indent = cluster.value[0][0].start_mark.column
        lines = [" " * indent + "configurations:"] + [
            f"{' ' * (indent + 2)}{k}: {_scalar_text(k, v, None)}" for k, v in values.items()]
        edits.append(_append_lines(text, cluster.value[-1][1], lines))
    else:
        key_node, node = conf
        if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null") and node.tag.endswith(":null"):
            indent = key_node.start_mark.column + 2
            line_end = text.find("\n", key_node.end_mark.index)
            line_end = len(text) if line_end < 0 else line_end
            block = "".join(f"\n{' ' * indent}{k}: {_scalar_text(k, v, None)}"
                            for k, v in values.items())
            edits.append((line_end, line_end, block))
        elif not isinstance(node, yaml.MappingNode):
            raise ConfigEditError(f"{cluster_name}.configurations is not a mapping")
        elif node.flow_style:
            parts, seen = [], set()
            for kn, vn in node.value:
                seen.add(kn.value)
                if kn.value in values:
                    parts.append(f"{kn.value}: {_scalar_text(kn.value, values[kn.value], vn)}")
                else:  # the pair as written
                    parts.append(text[kn.start_mark.index:vn.end_mark.index])
            for k, v in values.items():
                if k not in seen:
                    parts.append(f"{k}: {_scalar_text(k, v, None)}")
            edits.append((node.start_mark.index, node.end_mark.index, "{" + ", ".join(parts) + "}"))
        else:
            present = {k.value: (k, v) for k, v in node.value}
            indent = node.value[0][0].start_mark.column if node.value else key_node.start_mark.column + 2
            for k, v in values.items():
                if k in present:
                    _kn, vn = present[k]
                    if not isinstance(vn, yaml.ScalarNode):
                        raise ConfigEditError(f"{cluster_name}.configurations.{k} is not a scalar")
                    edits.append((vn.start_mark.index, vn.end_mark.index, _scalar_text(k, v, vn)))
            missing = [k for k in values if k not in present]
            if missing:
                lines = [f"{' ' * indent}{k}: {_scalar_text(k, values[k], None)}" for k in missing]
                edits.append(_append_lines(text, node.value[-1][1], lines))
    out = text
    for start, end, repl in sorted(edits, key=lambda e: e[0], reverse=True):
        out = out[:start] + repl + out[end:]
    _verify_edit(text, out, cluster_name, values)
    return out


def _verify_edit(before: str, after: str, cluster_name: str, values: Mapping[str, Any]) -> None:
    """The edit changed those keys and nothing else (else refuse to write)."""
    try:
        old, new = yaml.safe_load(before), yaml.safe_load(after)
    except yaml.YAMLError as exc:
        raise ConfigEditError(f"editing would break the YAML ({exc}); file left unchanged") from None
    def norm(doc: Any, apply: Mapping[str, Any] | None) -> Any:
        # quoting is kept from the file, so "8" and 8 both count as 8
        for section in (doc.get("providers") or {}).values():
            if isinstance(section, dict) and isinstance(section.get(cluster_name), dict):
                c = section[cluster_name]
                conf = dict(c.get("configurations") or {})
                conf.update(apply or {})
                c["configurations"] = {k: (str(v) if k in CONFIG_KEYS and not isinstance(v, bool)
                                           else v) for k, v in conf.items()}
        return doc

    if not isinstance(old, dict) or norm(old, values) != norm(new, None):
        raise ConfigEditError("the edit would change more than the configurations block; "
                              "file left unchanged")


def write_configurations(config_path: str | os.PathLike, cluster_name: str,
                         info: Mapping[str, Any]) -> dict[str, Any]:
    """Write `info["configurations"]` (from `cluster_info`) into the named
    cluster's configurations block of the YAML file; returns what was
    written. Comments, order and `${ENV}` references elsewhere stay as they
    were; the file is replaced atomically with its permissions kept."""
    path = Path(config_path)
    text = path.read_text()
    values = dict(info.get("configurations", info))
    values = {k: values[k] for k in CONFIG_KEYS if values.get(k) is not None}
    new = edit_configurations(text, cluster_name, values)
    if new != text:
        mode = path.stat().st_mode & 0o7777
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(new)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return values


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
