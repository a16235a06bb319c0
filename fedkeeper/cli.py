"""`fedkeeper` command line.

Exit status: 0 success, 1 a run failed (a cluster, a round, a session),
2 bad input (config, flags). Bad input never shows a traceback.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import click
import yaml
from rich.console import Console
from rich.table import Table

from .config import Config, ConfigError, load_config

console = Console(stderr=False, highlight=False)
errconsole = Console(stderr=True, highlight=False)
log = logging.getLogger("fedkeeper.cli")

DEFAULT_CONFIG = os.environ.get("FEDKEEPER_CONFIG", "config.yaml")


class UsageFailure(click.ClickException):
    """Bad input: exit status 2, message only."""

    exit_code = 2


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None


def _fail(message: str, code: int = 1) -> None:
    errconsole.print(f"[red]error:[/red] {message}", markup=True, highlight=False, soft_wrap=True)
    sys.exit(code)


config_option = click.option("-c", "--config", "--configfile", "config_path", default=DEFAULT_CONFIG,
                             show_default=True, type=click.Path(dir_okay=False),
                             help="YAML config (FedKeeper's config-sample.yaml schema).")
scenario_option = click.option("-s", "--scenario", "scenario", default=None,
                               help="Scenario under `scenarios:` (default: federated_learning).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fedkeeper")
def main() -> None:
    """Federated learning over serverless platforms."""


# --------------------------------------------------------------------------- config

@main.group("config")
def config_group() -> None:
    """Validate or show a config."""


@config_group.command("validate")
@config_option
def config_validate(config_path: str) -> None:
    """Check a config; exit 2 with the file, line and key when it is wrong."""
    cfg = _load(config_path)
    clusters = cfg.providers.clusters()
    console.print(f"{config_path}: valid ({len(clusters)} cluster(s), "
                  f"{len(cfg.scenarios)} scenario(s))")


@config_group.command("show")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
def config_show(config_path: str, as_json: bool) -> None:
    """Print the resolved config with defaults filled in and secrets redacted."""
    cfg = _load(config_path)
    data = cfg.redacted()
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))


# --------------------------------------------------------------------------- deploy / remove

def select_clusters(cfg: Config, names: Iterable[str] = (), *, all_clusters: bool = False,
                    sections: dict[str, list[str]] | None = None) -> list[str]:
    """Clusters named on the command line; all of them when none are named."""
    known = cfg.providers.clusters()
    chosen: list[str] = []
    for section, wanted in (sections or {}).items():
        for n in wanted:
            if n not in known or known[n][0] != section:
                options = sorted(k for k, (s, _) in known.items() if s == section)
                raise UsageFailure(f"no {section} cluster named {n!r} in {cfg.source} "
                                   f"(known: {options or 'none'})")
            chosen.append(n)
    for n in names:
        if n not in known:
            raise UsageFailure(f"no cluster named {n!r} in {cfg.source} (known: {sorted(known) or 'none'})")
        chosen.append(n)
    if all_clusters or not chosen:
        chosen = list(known)
    if not chosen:
        raise UsageFailure(f"{cfg.source} configures no clusters under providers")
    return list(dict.fromkeys(chosen))


def _open_runtime(cfg: Config, scenario: str | None, need_store: bool, keep_local_services: bool = False):
    from .runtime import Runtime
    from .store.embedded import EmbeddedMongoError
    try:
        return Runtime.open(cfg, scenario, need_store=need_store, keep_local_services=keep_local_services)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    except EmbeddedMongoError as exc:
        _fail(f"embedded MongoDB: {exc}")
    except Exception as exc:  # pymongo errors and the like: say what, not where
        _fail(f"cannot open the store: {exc}")


def _needs_store(functions: Iterable[str]) -> bool:
    return any(f != "nodeinfo" for f in functions)


def run_deploy(cfg: Config, scenario: str | None, functions: list[str] | None,
               clusters: list[str] | None, remove: bool = False) -> int:
    """Deploy (or remove) functions. With no function list: everything the
    scenario's training needs, where it needs it."""
    # Deployed functions stay deployed: local services outlive a deploy.
    rt = _open_runtime(cfg, scenario, need_store=(functions is None or _needs_store(functions)) and not remove,
                       keep_local_services=not remove)
    try:
        try:
            if functions:
                placements = rt.placements_for(functions, clusters or list(cfg.providers.clusters()))
            else:
                placements = rt.training_placements()
                if clusters:
                    placements = [p for p in placements if p.cluster in clusters]
        except ValueError as exc:
            raise UsageFailure(str(exc)) from None
        from .artifacts import ArtifactError
        verb = "remove" if remove else "deploy"
        table = Table(title=f"{verb} ({rt.scenario_name})")
        for col in ("cluster", "function", "result", "seconds"):
            table.add_column(col)
        failures = 0
        if remove:
            results = rt.remove(placements)
            for pl, existed, err in results:
                failures += err is not None
                table.add_row(pl.cluster, pl.spec.name,
                              f"[red]{err}[/red]" if err else ("removed" if existed else "not deployed"), "")
        else:
            try:
                results = rt.deploy(placements)
            except ArtifactError as exc:
                raise UsageFailure(str(exc)) from None
            for pl, res, err in results:
                failures += err is not None
                if err:
                    table.add_row(pl.cluster, pl.spec.name, f"[red]{err}[/red]", "")
                else:
                    table.add_row(pl.cluster, pl.spec.name, "unchanged" if res.skipped else "deployed",
                                  f"{res.seconds:.2f}")
        console.print(table)
        if failures:
            errconsole.print(f"[red]{failures} of {len(placements)} {verb} operation(s) failed[/red]")
        return 1 if failures else 0
    finally:
        rt.close()


@main.command("deploy")
@config_option
@scenario_option
@click.option("-f", "--function", "functions", multiple=True,
              help="Function to deploy (repeat or comma-separate); default: what training needs.")
@click.option("--cluster", "clusters", multiple=True, help="Only these clusters (repeatable).")
def deploy_cmd(config_path: str, scenario: str | None, functions: tuple[str, ...],
               clusters: tuple[str, ...]) -> None:
    """Deploy functions (content-hashed: unchanged ones are skipped)."""
    cfg = _load(config_path)
    fns = _split(functions) or None
    sys.exit(run_deploy(cfg, scenario, fns, select_clusters(cfg, _split(clusters)) if clusters else None))


@main.command("remove")
@config_option
@scenario_option
@click.option("-f", "--function", "functions", multiple=True)
@click.option("--cluster", "clusters", multiple=True)
def remove_cmd(config_path: str, scenario: str | None, functions: tuple[str, ...],
               clusters: tuple[str, ...]) -> None:
    """Remove deployed functions."""
    cfg = _load(config_path)
    fns = _split(functions) or None
    sys.exit(run_deploy(cfg, scenario, fns, select_clusters(cfg, _split(clusters)) if clusters else None,
                        remove=True))


def _split(values: Iterable[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


# --------------------------------------------------------------------------- start

class ConsoleProgress:
    """Round progress on the terminal: a live line on a TTY, one line per
    event otherwise (CI logs)."""

    def __init__(self, rounds: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        self.rounds = rounds
        self.live = console.is_terminal
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), console=console, transient=False) if self.live else None
        self.task = None
        self.acc: float | None = None

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
            self.task = self.bar.add_task("starting", total=self.rounds, info="")
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "deployed":
            state = "error: " + str(data["error"]) if data["error"] else (
                "unchanged" if data["skipped"] else "deployed")
            self._line(f"deploy {data['function']} on {data['cluster']}: {state}")
        elif kind == "session":
            self._line(f"session {data['session']}" + (" (resumed)" if data["resumed"] else ""))
        elif kind == "warning":
            self._line(f"warning: {data['message']}")
        elif kind == "init":
            self._line("initialising: partitioning data, storing the round-0 model")
        elif kind == "tick" and self.bar:
            acc = f"{self.acc:.3f}" if self.acc is not None else "-"
            self.bar.update(self.task, description=f"round {data['round'] + 1}/{self.rounds}",
                            info=f"done {data['delivered']} failed {data['failed']} "
                                 f"in flight {data['running']} retrying {data['retrying']}  acc {acc}")
        elif kind == "round":
            rep = data["report"]
            self.acc = rep.accuracy
            if self.bar:
                self.bar.update(self.task, completed=rep.round + 1)
            acc = f"{rep.accuracy:.4f}" if rep.accuracy is not None else "-"
            stale = f" + {rep.stale} late" if rep.stale else ""
            self._line(f"round {rep.round + 1}/{self.rounds}: {rep.delivered}/{rep.selected} clients{stale}, "
                       f"{rep.failed} failed, {rep.retries} retries, {rep.seconds:.1f}s, accuracy {acc}")

    def _line(self, text: str) -> None:
        if self.bar:
            self.bar.console.print(text)
        else:
            click.echo(text)


def run_start(cfg: Config, scenario: str | None, resume: str | None = None, deploy: bool = True,
              keep_services: bool = False, metrics_port: int | None = None) -> int:
    from .keeper import Keeper, SessionError, new_session_id
    from .logs import setup_run_log
    session_id = resume or new_session_id(cfg.name)
    log_path = setup_run_log(session_id, cfg.secret_values())
    rt = _open_runtime(cfg, scenario, need_store=True, keep_local_services=keep_services)
    if rt.scenario.clients_info is None:
        rt.close()
        raise UsageFailure(f"{cfg.source}: scenario {rt.scenario_name!r} has no clients_info; "
                           "it cannot be trained")
    try:
        keeper = Keeper(rt)
    except ValueError as exc:
        rt.close()
        raise UsageFailure(str(exc)) from None
    t0 = time.time()
    metrics = None
    try:
        with ConsoleProgress(rt.scenario.training.rounds) as progress:
            keeper.progress = progress
            if metrics_port is not None:
                from .metrics import KeeperMetrics, fan_out
                metrics = KeeperMetrics()
                port = metrics.start(metrics_port)
                progress._line(f"keeper metrics at http://127.0.0.1:{port}/metrics")
                keeper.progress = fan_out(progress, metrics)
                keeper.attempt_ended = metrics.record_attempt
            summary = keeper.start(resume=resume, deploy=deploy, session_id=session_id)
            from .cost import format_money, session_cost
            cost = session_cost(rt.store, summary.session, cfg)
    except SessionError as exc:
        _fail(str(exc))
    finally:
        if metrics is not None:
            metrics.stop()
        rt.close(stop_store=not keep_services)
    acc = summary.final_accuracy
    table = Table(title=f"session {summary.session}: {summary.state}")
    for col in ("rounds", "final accuracy", "wall time", "est. cost", "run log"):
        table.add_column(col)
    table.add_row(str(len(summary.rounds)), f"{acc:.4f}" if acc is not None else "-",
                  f"{time.time() - t0:.1f}s", format_money(cost["total"], cost["currency"]), str(log_path))
    console.print(table)
    _session_metrics(cfg, rt.scenario, time.time() - t0)
    if summary.state != "finished":
        errconsole.print(f"[red]session {summary.session} {summary.state}:[/red] {summary.message}")
        return 1
    return 0


def _session_metrics(cfg: Config, scenario, elapsed_s: float) -> None:
    """After a session: what each cluster's own Prometheus saw during it
    (cold starts, duration percentiles, error rate), where one is configured."""
    from .metrics import metrics_for_config, prometheus_url
    with_prom = [n for n, (_, c) in cfg.providers.clusters().items()
                 if prometheus_url(getattr(c, "prometheus_config", None))]
    if not with_prom:
        return
    rows = metrics_for_config(cfg, f"{int(elapsed_s) + 30}s", actions=list(scenario.functions) or None,
                              clusters=with_prom)
    t = Table(title="clusters' Prometheus during the session")
    for col in ("cluster", "activations", "cold starts", "error rate", "p50 s", "p95 s", "note"):
        t.add_column(col)
    for r in rows:
        d = r.row()
        fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        t.add_row(str(d.get("cluster")), fmt(d.get("activations")), fmt(d.get("cold_starts")),
                  fmt(d.get("error_rate")), fmt(d.get("duration_p50_s")), fmt(d.get("duration_p95_s")), str(d.get("error") or ""))
    console.print(t)


@main.command("start")
@config_option
@scenario_option
@click.option("--resume", metavar="SESSION", default=None, help="Continue a session after the keeper stopped.")
@click.option("--no-deploy", is_flag=True, help="Assume the functions are deployed already.")
@click.option("--keep-services", is_flag=True,
              help="Leave the embedded MongoDB and local fabric running after the session ends.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve the keeper's Prometheus metrics on this loopback port (0: any free port).")
def start_cmd(config_path: str, scenario: str | None, resume: str | None, no_deploy: bool,
              keep_services: bool, metrics_port: int | None) -> None:
    """Deploy (if needed) and run federated training."""
    cfg = _load(config_path)
    sys.exit(run_start(cfg, scenario, resume, deploy=not no_deploy, keep_services=keep_services,
                       metrics_port=metrics_port))


@main.command("metrics")
@config_option
@scenario_option
@click.option("--window", default="1h", show_default=True, help="Prometheus range such as 15m or 1h; 'all' for totals.")
@click.option("--cluster", "clusters", multiple=True, help="Only these clusters (repeatable).")
@click.option("--json", "as_json", is_flag=True)
def metrics_cmd(config_path: str, scenario: str | None, window: str, clusters: tuple[str, ...], as_json: bool) -> None:
    """Per-cluster cold starts, duration percentiles and error rates from each
    cluster's Prometheus (prometheus_config)."""
    from .metrics import metrics_for_config
    cfg = _load(config_path)
    try:
        name, scen = cfg.scenario(scenario)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    chosen = select_clusters(cfg, _split(clusters)) if clusters else None
    try:
        rows = metrics_for_config(cfg, None if window == "all" else window,
                                  actions=list(scen.functions) or None, clusters=chosen)
    except ValueError as exc:
        raise UsageFailure(str(exc)) from None
    data = [r.row() for r in rows]
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    t = Table(title=f"cluster metrics ({'all time' if window == 'all' else 'last ' + window})")
    cols = list(data[0].keys()) if data else ["cluster"]
    for c in cols:
        t.add_column(c)
    for row in data:
        t.add_row(*[("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)) for v in row.values()])
    console.print(t)


# --------------------------------------------------------------------------- status

def _status_data(store, session_id: str | None) -> dict[str, Any]:
    doc = store.session(session_id) if session_id else store.latest_session()
    if doc is None:
        raise UsageFailure(f"no session {session_id!r} in the store" if session_id else "no sessions in the store")
    sid = doc["_id"]
    attempts = store.attempts(sid)
    rounds = []
    for r in store.rounds(sid):
        mine = [a for a in attempts if a["round"] == r["round"] and not a["client"].startswith("_")]
        latest: dict[str, dict] = {}
        for a in mine:
            if a["attempt"] >= latest.get(a["client"], {}).get("attempt", 0):
                latest[a["client"]] = a
        rounds.append({
            "round": r["round"], "state": r.get("state"), "selected": len(r.get("selected", [])),
            "done": sum(1 for a in latest.values() if a.get("state") == "succeeded"),
            "failed": sum(1 for a in latest.values() if a.get("state") in ("failed", "timed_out", "abandoned")),
            "in_flight": sum(1 for a in latest.values() if a.get("state") in ("running", "submitting")),
            "retrying": sum(1 for a in latest.values()
                            if a["attempt"] > 1 and a.get("state") in ("running", "submitting")),
            "retries": sum(1 for a in mine if a["attempt"] > 1),
            "duration_s": r.get("duration_s"), "accuracy": r.get("accuracy"), "loss": r.get("loss"),
        })
    return {"session": sid, "state": doc.get("state"), "created": doc.get("created"),
            "error": doc.get("error"), "rounds": rounds}


def _status_table(data: dict[str, Any]) -> Table:
    t = Table(title=f"session {data['session']}: {data['state']}")
    for col in ("round", "state", "done", "failed", "in flight", "retrying", "retries", "seconds", "accuracy"):
        t.add_column(col, justify="right")
    for r in data["rounds"]:
        t.add_row(str(r["round"] + 1), str(r["state"]), f"{r['done']}/{r['selected']}", str(r["failed"]),
                  str(r["in_flight"]), str(r["retrying"]), str(r["retries"]),
                  f"{r['duration_s']:.1f}" if r["duration_s"] else "-",
                  f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-")
    return t


@main.command("status")
@click.argument("session", required=False)
@config_option
@scenario_option
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Refresh until the session ends.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes with --watch.")
def status_cmd(session: str | None, config_path: str, scenario: str | None, as_json: bool, watch: bool,
               interval: float) -> None:
    """Rounds of a session (default: the latest), from the store."""
    cfg = _load(config_path)
    rt = _open_runtime(cfg, scenario, need_store=True)
    try:
        if as_json:
            from .cost import session_cost
            data = _status_data(rt.store, session)
            data["cost"] = session_cost(rt.store, data["session"], cfg)
            click.echo(json.dumps(data, default=str, indent=2))
            return
        if not watch:
            console.print(_status_table(_status_data(rt.store, session)))
            return
        from rich.live import Live
        with Live(console=console, refresh_per_second=2) as live:
            while True:
                data = _status_data(rt.store, session)
                live.update(_status_table(data))
                if data["state"] not in ("running", "created"):
                    break
                time.sleep(interval)
    finally:
        rt.close()


# --------------------------------------------------------------------------- fabric

@main.group("fabric")
def fabric_group() -> None:
    """The embedded local OpenWhisk fabric."""


def _fabric():
    from .local import fabric
    from .runtime import state_dir
    return fabric, state_dir() / "fabric"


@fabric_group.command("up")
def fabric_up_cmd() -> None:
    """Start the local fabric (or report the running one)."""
    fabric, sdir = _fabric()
    try:
        info = fabric.fabric_up(sdir)
    except fabric.FabricError as exc:
        _fail(f"the local fabric did not start: {exc}")
    console.print(f"fabric {'started' if info.get('started') else 'running'} at {info['url']} (pid {info['pid']})")


@fabric_group.command("down")
def fabric_down_cmd() -> None:
    """Stop the local fabric, its workers and the local Cloud Functions hosts."""
    from .local import shutdown_local_services
    from .runtime import state_dir
    console.print("local services stopped" if shutdown_local_services(state_dir())
                  else "no local services were running")


@fabric_group.command("status")
def fabric_status_cmd() -> None:
    """Is the local fabric running, and where."""
    fabric, sdir = _fabric()
    st = fabric.fabric_status(sdir)
    if not st:
        console.print("fabric is not running")
        sys.exit(1)
    console.print(json.dumps({k: v for k, v in st.items() if k != "auth"}, indent=2, default=str))


# --------------------------------------------------------------------------- cluster

@main.group("cluster")
def cluster_group() -> None:
    """Kubernetes clusters behind the config (OpenWhisk on Kubernetes, Knative)."""


@cluster_group.command("info")
@click.argument("cluster", required=False)
@config_option
@click.option("--write-config", is_flag=True,
              help="Fill the cluster's `configurations` block (num_hosts, cores, RAM, GPU) from what was read.")
@click.option("--json", "as_json", is_flag=True)
def cluster_info_cmd(cluster: str | None, config_path: str, write_config: bool, as_json: bool) -> None:
    """Nodes, CPU, memory, GPUs and ready invoker/activator pods, read with the
    kubernetes client; differences from `configurations` are warned about."""
    from . import kube
    from .providers import ProviderError
    cfg = _load(config_path)
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


# --------------------------------------------------------------------------- check

@main.command("check")
@config_option
@scenario_option
@click.option("--cluster", "clusters", multiple=True, help="Only these clusters (repeatable or comma-separated).")
@click.option("-o", "ow_clusters", multiple=True, help="Only these OpenWhisk clusters (FedKeeper's -o).")
@click.option("-g", "gcf_clusters", multiple=True, help="Only these Google clusters (FedKeeper's -g).")
@click.option("--keep", is_flag=True, help="Leave nodeinfo deployed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--junit-xml", "junit_path", type=click.Path(dir_okay=False), default=None,
              help="Write a JUnit XML report for CI systems.")
def check_cmd(config_path: str, scenario: str | None, clusters: tuple[str, ...], ow_clusters: tuple[str, ...],
              gcf_clusters: tuple[str, ...], keep: bool, as_json: bool, junit_path: str | None) -> None:
    """Deploy nodeinfo to every cluster, invoke it cold and warm, remove it."""
    from .check import as_dicts, junit_xml, run_checks
    cfg = _load(config_path)
    chosen = select_clusters(cfg, _split(clusters),
                             sections={"openwhisk": _split(ow_clusters), "google": _split(gcf_clusters)})
    rt = _open_runtime(cfg, scenario, need_store=False)
    try:
        results = run_checks(rt, chosen, keep)
    finally:
        rt.close()
    if junit_path:
        Path(junit_path).write_bytes(junit_xml(results))
    if as_json:
        click.echo(json.dumps(as_dicts(results), indent=2, default=str))
    else:
        t = Table(title="cluster check (nodeinfo)")
        for col in ("cluster", "platform", "deploy s", "cold ms", "warm ms", "host", "result"):
            t.add_column(col)
        for r in results:
            host = r.host
            hinfo = (f"{host.get('hostname', '?')} {host.get('cpu_count', '?')} cpu "
                     f"{(host.get('memory_total_mb') or 0) / 1024:.1f} GiB py{host.get('python', '?')}") if host else ""
            t.add_row(r.cluster, r.platform, f"{r.deploy_s:.2f}" if r.deploy_s is not None else "-",
                      f"{r.cold_ms:.0f}" if r.cold_ms is not None else "-",
                      f"{r.warm_ms:.0f}" if r.warm_ms is not None else "-", hinfo,
                      "[green]ok[/green]" if r.ok else f"[red]{r.stage} failed: {r.error}[/red]")
        console.print(t)
    for r in results:
        for w in r.kube.get("warnings") or []:
            errconsole.print(f"cluster {r.cluster}: warning: {w}", markup=False)
        if r.kube.get("error"):
            errconsole.print(f"cluster {r.cluster}: could not read its nodes: {r.kube['error']}", markup=False)
    failed = [r for r in results if not r.ok]
    for r in failed:
        errconsole.print(f"cluster {r.cluster} failed at {r.stage}: {r.error}", markup=False)
    sys.exit(1 if failed else 0)


# Commands defined in their own modules (one `main.add_command` line each).
from .report import report_cmd; main.add_command(report_cmd)  # noqa: E402,E702
from .sweep import sweep_cmd; main.add_command(sweep_cmd)  # noqa: E402,E702
from .insights import insights_cmd; main.add_command(insights_cmd)  # noqa: E402,E702


if __name__ == "__main__":
    main()
