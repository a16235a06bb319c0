"""`fedkeeper cluster`: the Kubernetes clusters behind the config."""
from __future__ import annotations

import json
from typing import Any

import click

from .common import UsageFailure, config_option, console, load


@click.group("cluster")
def cluster_group() -> None:
    """Kubernetes clusters behind the config (OpenWhisk on Kubernetes, Knative)."""


@cluster_group.command("info")
@click.argument("cluster", required=False)
@config_option
@click.option("--write-config", is_flag=True,
              help="Fill the cluster's `configurations` block (num_hosts, cores, RAM, GPU) from what was read.")
@click.option("--json", "as_json", is_flag=True, help="Print what was read as JSON.")
def cluster_info_cmd(cluster: str | None, config_path: str, write_config: bool, as_json: bool) -> None:
    """Nodes, CPU, memory, GPUs and ready invoker/activator pods, read with the
    kubernetes client; differences from `configurations` are warned about."""
    from ..providers import kube
    from ..providers import ProviderError
    cfg = load(config_path)
    config_path = str(cfg.source)
    candidates = kube.kube_clusters(cfg)
    if cluster:
        if cluster not in cfg.providers.clusters():
            raise UsageFailure(f"no cluster named {cluster!r} in {config_path}")
        if cluster not in candidates:
            raise UsageFailure(f"cluster {cluster!r} names no kubeconfig, context, api_server or in_cluster")
        candidates = {cluster: candidates[cluster]}
    if not candidates:
        raise UsageFailure(f"{config_path} has no Kubernetes clusters (set kubeconfig/context on a cluster)")
    out: dict[str, Any] = {}
    for name, ccfg in candidates.items():
        try:
            info = kube.cluster_info(ccfg)
            if write_config:
                info["written"] = kube.write_configurations(config_path, name, info)
        except (ProviderError, kube.ConfigEditError) as exc:
            raise UsageFailure(f"cluster {name}: {exc}") from None
        out[name] = info
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    for name, info in out.items():
        console.print(f"[bold]{name}[/bold]")
        click.echo(kube.format_info(info))
        if info.get("written"):
            click.echo(f"wrote configurations of {name} in {config_path}: {info['written']}")
