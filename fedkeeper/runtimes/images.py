"""Container images of the runtimes, and building them.

Each platform that runs functions on a runtime image defines its variant of
that image (base image, whether it serves the HTTP entry, what the
Dockerfile says) in its provider package, and the provider registry
(`fedkeeper.providers.image_variant`) names them; every variant installs the
same pinned list.

An image is named `<prefix>/runtime-<runtime>:<variant>-<hash>`, the hash
taken over the Dockerfile and requirements it is built from, so that a
changed list (or base image) is a new tag and a deployed function never
silently runs on other packages.

Building needs `docker` or `podman` with a reachable engine. Where there is
none, `plan_build` still writes each build context under the state
directory, and the caller prints the Dockerfile and the exact commands.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import FunctionRuntime, load

DEFAULT_PREFIX = "fedkeeper"
ENGINES = ("docker", "podman")
ENGINE_PROBE_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class ImageVariant:
    """One platform's kind of runtime image, defined by its provider package."""
    name: str                 # the image tag's first part, e.g. `<name>-<hash>`
    base_image: str           # FROM, pinned so that the content hash means one content
    http_entry: bool          # the image serves main.py over HTTP (adds the HTTP entry's packages)
    header: str               # the Dockerfile's opening comment; `{runtime}` is the runtime's name
    final_lines: tuple[str, ...] = ()   # Dockerfile lines after the list is installed

    def dockerfile(self, runtime: str) -> str:
        comment = "".join(f"# {line}\n" for line in self.header.format(runtime=runtime).splitlines())
        return (f"{comment}FROM {self.base_image}\n"
                "COPY requirements.txt /fedkeeper/requirements.txt\n"
                "RUN pip install --no-cache-dir -r /fedkeeper/requirements.txt\n"
                + "".join(f"{line}\n" for line in self.final_lines))


def variant_names() -> tuple[str, ...]:
    """The image variants the provider registry knows, in its order."""
    from ..providers import image_variant_names
    return image_variant_names()


def image_variant(name: str) -> ImageVariant:
    from ..providers import image_variant as registered
    try:
        return registered(name)
    except KeyError:
        raise ValueError(f"unknown image variant {name!r}; expected one of {', '.join(variant_names())}") from None


@dataclass(frozen=True)
class ImageRecipe:
    runtime: str
    variant: str
    dockerfile: str
    requirements: str
    tag: str              # content hash part of the image reference

    def image(self, prefix: str = DEFAULT_PREFIX) -> str:
        return f"{prefix.rstrip('/')}/runtime-{self.runtime}:{self.tag}"


def recipe(runtime: FunctionRuntime | str, variant: str) -> ImageRecipe:
    rt = load(runtime) if isinstance(runtime, str) else runtime
    kind = image_variant(variant)
    requirements = rt.requirements_txt(http_entry=kind.http_entry)
    dockerfile = kind.dockerfile(rt.name)
    digest = hashlib.sha256(dockerfile.encode() + b"\0" + requirements.encode()).hexdigest()
    return ImageRecipe(rt.name, kind.name, dockerfile, requirements, f"{kind.name}-{digest[:12]}")


def runtime_image(runtime: str, variant: str, prefix: str | None = None) -> str:
    """The image a function of `runtime` deploys on, for a platform variant."""
    return recipe(runtime, variant).image(prefix or DEFAULT_PREFIX)


# ------------------------------------------------------------------ building

@dataclass
class Engine:
    command: str              # docker or podman
    path: str | None          # None: not installed
    reachable: bool
    detail: str = ""


def find_engine() -> Engine:
    """The first of docker/podman whose engine answers; else what was found
    and why it cannot build."""
    found: Engine | None = None
    for cmd in ENGINES:
        path = shutil.which(cmd)
        if path is None:
            continue
        try:
            r = subprocess.run([path, "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                               text=True, timeout=ENGINE_PROBE_TIMEOUT_S)
            ok = r.returncode == 0
            detail = (r.stdout if ok else r.stderr).strip().splitlines()
            engine = Engine(cmd, path, ok, detail[-1] if detail else "")
        except (OSError, subprocess.TimeoutExpired) as exc:
            engine = Engine(cmd, path, False, f"{type(exc).__name__}: {exc}")
        if engine.reachable:
            return engine
        found = found or engine
    return found or Engine(ENGINES[0], None, False, "neither docker nor podman is installed")


@dataclass
class BuildStep:
    recipe: ImageRecipe
    image: str
    context: Path
    commands: list[list[str]]


def plan_build(runtimes: list[str], variants: list[str], state_dir: Path, *,
               prefix: str | None = None, push: bool = False, engine: str = "docker") -> list[BuildStep]:
    """Write each image's build context (Dockerfile, requirements.txt) under
    `state_dir/runtime-images/` and return the commands that build (and
    push) it."""
    steps: list[BuildStep] = []
    for name in runtimes:
        for variant in variants:
            rec = recipe(name, variant)
            image = rec.image(prefix or DEFAULT_PREFIX)
            ctx = state_dir / "runtime-images" / f"{rec.runtime}-{rec.tag}"
            ctx.mkdir(parents=True, exist_ok=True)
            (ctx / "Dockerfile").write_text(rec.dockerfile)
            (ctx / "requirements.txt").write_text(rec.requirements)
            cmds = [[engine, "build", "-t", image, str(ctx)]]
            if push:
                cmds.append([engine, "push", image])
            steps.append(BuildStep(rec, image, ctx, cmds))
    return steps


def run_step(step: BuildStep, engine_path: str, echo=print) -> int:
    """Run a step's commands with the engine found; the first failing
    command's exit status, else 0."""
    for cmd in step.commands:
        echo("$ " + " ".join(cmd))
        r = subprocess.run([engine_path, *cmd[1:]])
        if r.returncode != 0:
            return r.returncode
    return 0


def runtime_of_image(image: str) -> str | None:
    """The runtime an image reference was made for by `recipe`, when its tag
    is the current recipe's (`.../runtime-<name>:<variant>-<hash>`); None
    for any other image (the function's own, or one built from another
    list), which a local platform cannot reproduce."""
    repo, _, tag = image.rpartition(":")
    name = repo.rsplit("/", 1)[-1]
    if "/" in tag or not name.startswith("runtime-"):
        return None
    runtime = name[len("runtime-"):]
    variant = tag.split("-", 1)[0]
    if variant not in variant_names():
        return None
    try:
        return runtime if recipe(runtime, variant).tag == tag else None
    except (ValueError, LookupError):
        return None
