"""Checks across sections: the clusters a scenario names exist, cluster
names are unique, placements add up, buffers can fill. Also run by
`fedkeeper sweep` on every combination it derives."""
from __future__ import annotations

from .errors import ConfigError, did_you_mean, dotted, line_for
from .model import Config


def check_references(cfg: Config, index: dict) -> None:
    def refuse(path: tuple, message: str):
        raise ConfigError(message, file=cfg.source, line=line_for(index, path), path=dotted(path))

    seen: dict[str, str] = {}
    for section, clusters in cfg.providers.sections().items():
        for name in clusters:
            if name in seen:
                refuse(("providers", section, name), f"cluster name {name!r} is also used under "
                                                     f"providers.{seen[name]}; names must be unique")
            seen[name] = section
    clusters = cfg.providers.clusters()

    def unknown(name: str) -> str:
        return (f"names cluster {name!r}, which is not under providers "
                f"(known: {sorted(clusters) or 'none'}){did_you_mean(name, clusters)}")

    for sname, scen in cfg.scenarios.items():
        at = ("scenarios", sname)
        sc = scen.server_config
        if sc and sc.server_cluster_name and sc.server_cluster_name not in clusters:
            refuse(at + ("server_config", "server_cluster_name"), unknown(sc.server_cluster_name))
        if scen.insights.cluster and scen.insights.cluster not in clusters:
            refuse(at + ("insights", "cluster"), unknown(scen.insights.cluster))
        t, ci = scen.training, scen.clients_info
        if t.mode == "async" and t.buffer_size and ci and t.buffer_size > ci.num_clients_per_round:
            refuse(at + ("training", "buffer_size"), f"buffer_size {t.buffer_size} exceeds "
                   f"num_clients_per_round {ci.num_clients_per_round}: a buffer could never fill")
        if ci is None:
            continue
        if ci.clusters:
            for cname in ci.clusters:
                if cname not in clusters:
                    refuse(at + ("clients_info", "clusters", cname),
                           f"no cluster named {cname!r} under providers{did_you_mean(cname, clusters)}")
            assigned = sum(len(spec) if isinstance(spec, list) else spec for spec in ci.clusters.values())
            if assigned != ci.total_num_clients:
                refuse(at + ("clients_info", "clusters"),
                       f"places {assigned} clients but total_num_clients is {ci.total_num_clients}")
        else:
            try:
                ci.placement(cfg.providers)
            except ValueError as exc:
                key = str(exc).split(" ", 1)[0].rpartition(".")[2]
                refuse(at + ("clients_info", key), str(exc))
