"""Container images of the runtimes, and building them.

Two variants of each runtime's image, both from the same pinned list:

  openwhisk  FROM OpenWhisk's Python action image: deployed as a Docker
             action (`exec.kind: blackbox`, `image`) with the function's zip
             as `exec.code`; OpenWhisk's action loop runs its `__main__.py`.
  knative    FROM a plain Python image, with functions-framework: the
             Knative Service mounts the function's zip and serves `main.py`.

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

#: OpenWhisk's Python 3.11 action runtime (apache/openwhisk-runtime-python),
#: whose action loop accepts a zip with `__main__.py` as a Docker action's
#: code. Its CI tags each build with the commit (besides a moving `nightly`);
#: a fixed one (Python 3.11.7, as the tests run) keeps an image's content
#: hash meaning one content.
OPENWHISK_PYTHON_BASE = "openwhisk/action-python-v3.11:c0a1e6d"
#: the Knative variant's base: the Python the tests and the OpenWhisk base run, fixed
KNATIVE_PYTHON_BASE = "python:3.11.7-slim-bookworm"
VARIANTS = ("openwhisk", "knative")
DEFAULT_PREFIX = "fedkeeper"
ENGINES = ("docker", "podman")
ENGINE_PROBE_TIMEOUT_S = 20.0


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
    if variant not in VARIANTS:
        raise ValueError(f"unknown image variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    http = variant == "knative"
    requirements = rt.requirements_txt(http_entry=http)
    if variant == "openwhisk":
        dockerfile = (
            f"# FedKeeper runtime {rt.name} for OpenWhisk Docker actions (exec.kind: blackbox).\n"
            "# The function's zip arrives as exec.code; the action loop of the base\n"
            "# image runs its __main__.py main(args).\n"
            f"FROM {OPENWHISK_PYTHON_BASE}\n"
            "COPY requirements.txt /fedkeeper/requirements.txt\n"
            "RUN pip install --no-cache-dir -r /fedkeeper/requirements.txt\n")
    else:
        dockerfile = (
            f"# FedKeeper runtime {rt.name} for Knative: the Service mounts the function's\n"
            "# zip and serves its main.py with functions-framework on $PORT.\n"
            f"FROM {KNATIVE_PYTHON_BASE}\n"
            "COPY requirements.txt /fedkeeper/requirements.txt\n"
            "RUN pip install --no-cache-dir -r /fedkeeper/requirements.txt\n"
            "ENV PYTHONUNBUFFERED=1\n")
    digest = hashlib.sha256(dockerfile.encode() + b"\0" + requirements.encode()).hexdigest()
    return ImageRecipe(rt.name, variant, dockerfile, requirements, f"{variant}-{digest[:12]}")


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
    if variant not in VARIANTS:
        return None
    try:
        return runtime if recipe(runtime, variant).tag == tag else None
    except (ValueError, LookupError):
        return None
