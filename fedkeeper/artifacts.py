"""Reproducible, content-hashed source zips of the functions under functions/.

A function folder holds its logic once (`<name>.py` or a package) plus one
thin entry per platform style:
  __main__.py  the OpenWhisk entry (`main(args)`)
  main.py      the HTTP entry served by functions-framework (Cloud Functions,
               Knative)
The zip carries the function folder, the shared `flcommon` library (the
function runtime, strategies included; it never imports the keeper) and only
the entry its platform uses. An HTTP artifact also carries the
`requirements.txt` of the function's declared runtime (fedkeeper/runtimes),
which is how Cloud Functions' Python buildpack learns what to install.
Entries are fixed, timestamps are zeroed and files are sorted, so the same
source always gives the same hash and an unchanged function is never
uploaded twice.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from .providers.base import Artifact, UploadPlan
from .runtimes import RuntimeDeclarationError, runtime_for

FUNCTIONS_DIR = Path(__file__).resolve().parent.parent / "functions"
ENTRY_FILES = {"openwhisk": "__main__.py", "http": "main.py"}
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
#: where the buildpack looks for the function's dependencies (next to main.py)
REQUIREMENTS = "requirements.txt"


class ArtifactError(ValueError):
    pass


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


@lru_cache(maxsize=64)
def build_artifact(source: str, entry: str, extra: tuple[tuple[str, bytes], ...] = ()) -> Artifact:
    """`extra`: (arcname, bytes) added to the zip, e.g. a user module (fedkeeper.user_module)."""
    if entry not in ENTRY_FILES:
        raise ArtifactError(f"unknown entry style {entry!r}; expected one of {sorted(ENTRY_FILES)}")
    fdir = FUNCTIONS_DIR / source
    if not fdir.is_dir():
        raise ArtifactError(f"no function folder functions/{source}")
    entry_file = ENTRY_FILES[entry]
    if not (fdir / entry_file).is_file():
        raise ArtifactError(f"functions/{source} has no {entry_file} entry")
    other_entries = set(ENTRY_FILES.values()) - {entry_file}
    try:
        runtime = runtime_for(source)
    except RuntimeDeclarationError as exc:
        raise ArtifactError(str(exc)) from None
    generated: dict[str, bytes] = {}
    if entry == "http":
        generated[REQUIREMENTS] = runtime.requirements_txt(http_entry=True).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        members: list[tuple[str, Path]] = []
        for p in _files(fdir):
            rel = p.relative_to(fdir).as_posix()
            if rel in other_entries:
                continue
            if rel in generated:
                raise ArtifactError(f"functions/{source}/{rel} would be replaced by the one its runtime "
                                    f"({runtime.name}) generates; declare dependencies in the runtime")
            members.append((rel, p))
        for p in _files(FUNCTIONS_DIR / "flcommon"):
            members.append(("flcommon/" + p.relative_to(FUNCTIONS_DIR / "flcommon").as_posix(), p))
        contents = [(arcname, path.read_bytes()) for arcname, path in members]
        contents += list(generated.items()) + list(extra)
        for arcname, data in sorted(contents):
            info = zipfile.ZipInfo(arcname, date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    data = buf.getvalue()
    return Artifact(data=data, sha256=hashlib.sha256(data).hexdigest(), entry=entry, runtime=runtime.name)


def plan_uploads(placements: Iterable[Any], clusters: dict[str, tuple[str, Any]],
                 extra_for: Callable[[str], tuple[tuple[str, bytes], ...]] = lambda source: ()
                 ) -> list[tuple[Any, UploadPlan | None, str | None]]:
    """What deploying `placements` would upload where, each checked against
    its platform's limit, without a provider: no network call, no local
    service started. `extra_for(source)`: the files a deploy adds to that
    function's zip (the scenario's user module), so that the sizes are the
    deploy's. (placement, plan or None, error or None) per placement."""
    from .providers import ProviderError, provider_class
    out: list[tuple[Any, UploadPlan | None, str | None]] = []
    for pl in placements:
        section, cluster = clusters[pl.cluster]
        try:
            cls = provider_class(section, getattr(cluster, "kind", "remote"))
            artifact = build_artifact(pl.spec.source, cls.entry, extra_for(pl.spec.source))
            plan = cls.plan_upload(pl.cluster, cluster, pl.spec, artifact)
        except (ArtifactError, ProviderError) as exc:
            out.append((pl, None, str(exc)))
            continue
        error = None
        if not plan.within_limit:
            error = (f"{pl.spec.name} on {pl.cluster}: {plan.bytes} bytes exceed {plan.limit_source} "
                     f"of {plan.limit_bytes} bytes")
        out.append((pl, plan, error))
    return out
