"""Checks across sections: the clusters a scenario names exist, cluster
names are unique, placements add up, buffers can fill. Also run by
`fedkeeper sweep` on every combination it derives."""
from __future__ import annotations

from typing import Optional

from ..privacy.settings import scenario_refusal
from ..user_module import module_path as user_module_path
from .clusters import cluster_model, provider_sections
from .errors import ConfigError, did_you_mean, dotted, line_for
from .model import Config
from .scenario import PlacementError
from .units import format_duration_s, format_memory_mb
from .values import cluster_name


def known_functions() -> Optional[set[str]]:
    """The functions FedKeeper can deploy (its functions/ folders), or None
    where the sources are not at hand."""
    from ..artifacts import FUNCTIONS_DIR
    if not FUNCTIONS_DIR.is_dir():
        return None
    return {p.name for p in FUNCTIONS_DIR.iterdir()
            if p.is_dir() and p.name != "flcommon" and not p.name.startswith((".", "_"))}


def _check_function_limits(section: str, fc, refuse) -> None:
    """Memory and timeout within what the section's platform allows anywhere
    (a cluster's own, lower limits are checked before upload)."""
    if section not in provider_sections():
        return  # a section of the original schema FedKeeper ignores
    model = cluster_model(section)
    top_mb, top_s = model.function_memory_mb_max, model.function_timeout_s_max
    if top_mb is not None and fc.memory is not None and fc.memory > top_mb:
        refuse("memory", f"{format_memory_mb(fc.memory)} exceeds the platform's limit of "
                         f"{format_memory_mb(top_mb)}")
    if top_s is not None and fc.timeout is not None and fc.timeout > top_s:
        refuse("timeout", f"{format_duration_s(fc.timeout)} exceeds the platform's limit of "
                          f"{format_duration_s(top_s)}")


def _check_via_invoker(section: str, cluster, refuse) -> None:
    """via_invoker needs a platform that tracks invocations by id alone (the
    keeper checks it again at start); asked of the provider class, imported
    only for such a cluster."""
    from ..providers import ProviderError, provider_class
    try:
        cls = provider_class(section, cluster.kind)
    except ProviderError:
        return  # the provider cannot be imported here; `check` and `start` say so
    if not cls.tracks_foreign_invocations:
        refuse(f"via_invoker needs a platform whose invocations can be tracked by id "
               f"({cls.platform} cannot); use invocation: direct")


def check_references(cfg: Config, index: dict) -> None:
    def refuse(path: tuple, message: str):
        raise ConfigError(message, file=cfg.source, line=line_for(index, path), path=dotted(path))

    seen: dict[str, str] = {}
    for section, clusters in cfg.providers.sections().items():
        for name in clusters:
            try:
                cluster_name(name)
            except ValueError as exc:
                refuse(("providers", section, name), str(exc))
            if name in seen:
                refuse(("providers", section, name), f"cluster name {name!r} is also used under "
                                                     f"providers.{seen[name]}; names must be unique")
            seen[name] = section
    for name, (section, cluster) in cfg.providers.clusters().items():
        if getattr(cluster, "invocation", "direct") == "via_invoker":
            _check_via_invoker(section, cluster, lambda message, n=name, s=section: refuse(
                ("providers", s, n, "invocation"), message))
    functions = known_functions()
    for name, (section, cluster) in cfg.providers.clusters().items():
        faults = getattr(cluster, "faults", None)
        for i, fname in enumerate(getattr(faults, "functions", None) or []):
            _check_function_name(("providers", section, name, "faults", "functions", i), fname, functions, refuse)
    for sname, scen in cfg.scenarios.items():
        _check_functions(("scenarios", sname), scen, functions, refuse)
        _check_clusters_and_clients(("scenarios", sname), scen, cfg.providers, refuse)
        if scen.user_module is not None and not user_module_path(cfg, scen).exists():
            refuse(("scenarios", sname, "user_module"), f"{scen.user_module.path}: no such file or "
                                                      "directory (relative to the config file)")


def _check_function_name(path: tuple, name: str, functions: Optional[set[str]], refuse) -> None:
    if functions is not None and name not in functions:
        refuse(path, f"no function named {name!r} (FedKeeper has {', '.join(sorted(functions))})"
                     f"{did_you_mean(name, functions)}")


def _check_functions(at: tuple, scen, functions: Optional[set[str]], refuse) -> None:
    """Every function a scenario names exists, within its platform's limits."""
    def check_name(path: tuple, name: str) -> None:
        _check_function_name(path, name, functions, refuse)

    for fname, per in scen.functions.items():
        check_name(at + ("functions", fname), fname)
        for section, fc in per.items():
            _check_function_limits(section, fc, lambda key, message, p=at + ("functions", fname, section):
                                   refuse(p + (key,), message))
    sc = scen.server_config
    for i, fname in enumerate(sc.server_manager_functions if sc else []):
        check_name(at + ("server_config", "server_manager_functions", i), fname)
    for i, fname in enumerate(scen.clients_info.client_functions if scen.clients_info else []):
        check_name(at + ("clients_info", "client_functions", i), fname)


def _check_clusters_and_clients(at: tuple, scen, providers, refuse) -> None:
    """The clusters a scenario names exist; its clients are placed, once
    each; what depends on the clients per round can work."""
    clusters = providers.clusters()

    def unknown(name: str) -> str:
        return (f"names cluster {name!r}, which is not under providers "
                f"(known: {sorted(clusters) or 'none'}){did_you_mean(name, clusters)}")

    sc, t, ci = scen.server_config, scen.training, scen.clients_info
    if sc and sc.server_cluster_name and sc.server_cluster_name not in clusters:
        refuse(at + ("server_config", "server_cluster_name"), unknown(sc.server_cluster_name))
    if scen.insights.cluster and scen.insights.cluster not in clusters:
        refuse(at + ("insights", "cluster"), unknown(scen.insights.cluster))
    if ci is None:
        return
    if t.mode == "async" and t.buffer_size and t.buffer_size > ci.num_clients_per_round:
        refuse(at + ("training", "buffer_size"), f"buffer_size {t.buffer_size} exceeds "
               f"num_clients_per_round {ci.num_clients_per_round}: a buffer could never fill")
    why = scenario_refusal(t.privacy, ci.num_clients_per_round)
    if why:
        refuse(at + ("training", "privacy"), why)
    if ci.clusters:
        for cname in ci.clusters:
            if cname not in clusters:
                refuse(at + ("clients_info", "clusters", cname),
                       f"no cluster named {cname!r} under providers{did_you_mean(cname, clusters)}")
        assigned = sum(len(spec) if isinstance(spec, list) else spec for spec in ci.clusters.values())
        if assigned != ci.total_num_clients:
            refuse(at + ("clients_info", "clusters"),
                   f"places {assigned} clients but total_num_clients is {ci.total_num_clients}")
        return
    try:
        ci.placement(providers)
    except PlacementError as exc:
        refuse(at + ("clients_info", exc.key), str(exc))
