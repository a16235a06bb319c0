"""What an OpenWhisk action is made of: its `exec` (stock Python kind or a
Docker action on the function's runtime image) and the code size check.

OpenWhisk's stock Python runtime has none of numpy, pymongo or TensorFlow,
so a function whose declared runtime lists packages deploys as a Docker
action (`exec.kind: blackbox`) on the image `fedkeeper runtime build`
produces for that runtime, with its zip as `exec.code`: the image's action
loop runs the zip's `__main__.py`. A function's own `docker_image` wins; an
explicit `runtime` (an OpenWhisk kind such as `python:3.11`) states that the
stock runtime is enough.

Binary code travels base64-encoded, and OpenWhisk's `codeSize` limit (48 MB
by default) applies to what it stores: the encoded code.
"""
from __future__ import annotations

import base64
from typing import Any

from ...runtimes.images import runtime_image
from ..base import Artifact, ErrorClass, FunctionSpec, ProviderError, UploadPlan

#: OpenWhisk's default codeSize limit (docs/reference.md of apache/openwhisk)
DEFAULT_CODE_SIZE_LIMIT = 48 * 1024 * 1024
STOCK_KIND = "python:3"


def encoded_size(nbytes: int) -> int:
    return 4 * ((nbytes + 2) // 3)


def image_for(spec: FunctionSpec, artifact: Artifact, image_prefix: str | None) -> str | None:
    """The Docker image the action runs on, or None for a stock kind."""
    if spec.image:
        return spec.image
    if spec.runtime or not artifact.runtime:
        return None
    return runtime_image(artifact.runtime, "openwhisk", image_prefix)


def action_exec(spec: FunctionSpec, artifact: Artifact, image_prefix: str | None) -> dict[str, Any]:
    code = base64.b64encode(artifact.data).decode()
    image = image_for(spec, artifact, image_prefix)
    if image:
        return {"kind": "blackbox", "image": image, "code": code, "binary": True, "main": "main"}
    return {"kind": spec.runtime or STOCK_KIND, "code": code, "binary": True, "main": "main"}


def namespace_code_limit(limits: dict[str, Any] | None) -> int | None:
    """The namespace's code size limit in bytes, where `GET /limits` reports
    one (`codeSize`, in MB as OpenWhisk's limit tables give it)."""
    value = (limits or {}).get("codeSize")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value * 1024 * 1024)
    return None


def check_code_size(spec: FunctionSpec, artifact: Artifact, limit: int, cluster: str) -> None:
    size = encoded_size(len(artifact.data))
    if size > limit:
        raise ProviderError(
            ErrorClass.PAYLOAD_TOO_LARGE,
            f"{spec.name} on OpenWhisk cluster {cluster}: the action code is {size} bytes base64-encoded "
            f"({len(artifact.data)} bytes zipped), over the code size limit of {limit} bytes; move "
            "dependencies into the runtime image instead of the zip", status=413)


def upload_plan(spec: FunctionSpec, artifact: Artifact, cluster_name: str, cluster: Any,
                code_limit: int | None) -> UploadPlan:
    """What deploying `spec` would upload where; `code_limit` is the
    namespace's own limit when known, else OpenWhisk's default applies."""
    remote = getattr(cluster, "kind", "remote") == "remote" and hasattr(cluster, "api_host")
    target = f"{cluster.api_host() if remote else 'the local fabric'} action {spec.name}"
    image = image_for(spec, artifact, getattr(cluster, "image_registry", None))
    what = (f"Docker action (blackbox) on {image}" if image
            else f"action of kind {spec.runtime or STOCK_KIND}")
    return UploadPlan(cluster=cluster_name, function=spec.name, platform="openwhisk", target=target,
                      what=what, bytes=encoded_size(len(artifact.data)),
                      limit_bytes=code_limit or DEFAULT_CODE_SIZE_LIMIT,
                      limit_source="the namespace's codeSize limit" if code_limit else "OpenWhisk's default codeSize",
                      runtime=artifact.runtime, image=image)
