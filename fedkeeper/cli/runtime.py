"""`fedkeeper runtime show|build`, and `fedkeeper deploy --dry-run`: what the
functions are made of and what a deploy would upload where."""
from __future__ import annotations

import shlex
import sys

import click
from rich.markup import escape

from ..config import Config
from ..runtimes.images import variant_names
from .common import UsageFailure, console, errconsole, note, open_runtime, print_json, show_table


def _runtimes():
    from .. import runtimes
    return runtimes


@click.group("runtime")
def runtime_group() -> None:
    """The functions' runtimes: pinned dependency sets and their images."""


@runtime_group.command("show")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def runtime_show(names: tuple[str, ...], as_json: bool) -> None:
    """Each runtime's pinned list, the functions declaring it and its images."""
    rts = _runtimes()
    from ..runtimes.images import runtime_image
    try:
        chosen = list(names) or rts.runtime_names()
        users = rts.functions_by_runtime()
        data = [{"runtime": n, "hash": rts.load(n).content_hash[:12],
                 "requirements": [str(p) for p in rts.load(n).pins],
                 "http_entry_adds": [str(p) for p in rts.load_list(rts.HTTP_ENTRY_LIST)],
                 "functions": users.get(n, []),
                 "images": {v: runtime_image(n, v) for v in variant_names()}} for n in chosen]
    except rts.RuntimeDeclarationError as exc:
        raise UsageFailure(str(exc)) from None
    if as_json:
        print_json(data)
        return
    for d in data:
        console.print(f"[bold]{d['runtime']}[/bold] ({d['hash']}): functions {', '.join(d['functions']) or '-'}")
        for line in d["requirements"]:
            click.echo(f"  {line}")
        click.echo(f"  (+ {', '.join(d['http_entry_adds'])} for the HTTP entry)")
        for variant, image in d["images"].items():
            click.echo(f"  {variant} image: {image}")


@runtime_group.command("build")
@click.argument("names", nargs=-1)
@click.option("--push", "registry", default=None, metavar="REGISTRY",
              help="Name the images under REGISTRY (e.g. ghcr.io/acme) and push them there.")
@click.option("--variant", "variants", multiple=True, type=click.Choice(variant_names()),
              help="Only these image variants (default: all).")
def runtime_build(names: tuple[str, ...], registry: str | None, variants: tuple[str, ...]) -> None:
    """Build (and push) the runtime images with docker or podman; where
    neither can build, print the Dockerfiles and the exact commands."""
    rts = _runtimes()
    from ..runtime import state_dir
    from ..runtimes import images
    try:
        chosen = list(names) or rts.runtime_names()
        for n in chosen:
            rts.load(n)
    except rts.RuntimeDeclarationError as exc:
        raise UsageFailure(str(exc)) from None
    engine = images.find_engine()
    steps = images.plan_build(chosen, list(variants) or list(variant_names()), state_dir(),
                              prefix=registry, push=registry is not None, engine=engine.command)
    if not engine.reachable:
        why = ("neither docker nor podman is installed" if engine.path is None
               else f"{engine.command} is installed but its engine is unreachable ({engine.detail})")
        for s in steps:
            click.echo(f"# {s.image}  (build context {s.context})")
            click.echo(s.recipe.dockerfile)
            for cmd in s.commands:
                click.echo("  " + shlex.join(cmd))
            click.echo("")
        note(f"note: nothing was built: {why}. Run the commands above where an engine is available.")
        return
    for s in steps:
        status = images.run_step(s, engine.path, echo=click.echo)
        if status != 0:
            errconsole.print(f"[red]Error:[/red] building {escape(s.image)} failed (exit {status})")
            sys.exit(1)
        click.echo(f"built {s.image}" + (" and pushed it" if registry else ""))


def dry_run_deploy(cfg: Config, scenario: str | None, functions: list[str] | None,
                   clusters: list[str] | None, as_json: bool = False) -> int:
    """`deploy --dry-run`: what would be uploaded where, with sizes and
    limits; no network, no store. Exit 1 when something would not fit."""
    from flcommon.user_code import UserCodeError
    from ..artifacts import plan_uploads
    from ..user_module import UserModuleError, artifact_members as user_module_members
    rt = open_runtime(cfg, scenario, need_store=False)
    try:
        try:
            if functions:
                placements = rt.placements_for(functions, clusters or list(cfg.providers.clusters()))
            else:
                placements = [p for p in rt.training_placements() if not clusters or p.cluster in clusters]
        except ValueError as exc:
            raise UsageFailure(str(exc)) from None
        rows = []
        try:
            # the scenario's user module, which a deploy adds to the functions that run it
            uploads = plan_uploads(placements, cfg.providers.clusters(),
                                   lambda source: user_module_members(cfg, rt.scenario, source))
        except (UserModuleError, UserCodeError) as exc:
            # Reading the module's files (module_files) refuses one too large or not a .py file or package.
            um = rt.scenario.user_module
            where = f"scenarios.{rt.scenario_name}.user_module ({um.path}): " if um is not None else ""
            raise UsageFailure(f"{where}{exc}") from None
        for pl, plan, error in uploads:
            rows.append({"cluster": pl.cluster, "function": pl.spec.name,
                         "platform": plan.platform if plan else None, "target": plan.target if plan else None,
                         "what": plan.what if plan else None, "runtime": plan.runtime if plan else None,
                         "bytes": plan.bytes if plan else None, "limit_bytes": plan.limit_bytes if plan else None,
                         "error": error})
    finally:
        rt.close()
    failures = sum(1 for r in rows if r["error"])
    if as_json:
        print_json(rows)
    else:
        show_table(f"deploy --dry-run ({rt.scenario_name}): nothing uploaded",
                   ("cluster", "function", "upload", "bytes", "limit"),
                   [[r["cluster"], r["function"],
                     f"[red]{escape(r['error'])}[/red]" if r["error"] and not r["what"]
                     else escape(f"{r['what']} -> {r['target']}"),
                     "" if r["bytes"] is None else str(r["bytes"]),
                     "-" if r["limit_bytes"] is None else str(r["limit_bytes"])] for r in rows],
                   right=("bytes", "limit"))
        for r in rows:
            if r["error"]:
                errconsole.print(f"[red]Error:[/red] {escape(r['error'])}")
    return 1 if failures else 0

