"""The source a Cloud Functions deployment uploads, and its size limit.

The zip (artifacts.py) carries `main.py` at its root and the
`requirements.txt` of the function's declared runtime next to it, as the
Python buildpack expects; the buildpack installs those pins at build time.

Cloud Functions documents 100 MB (compressed) as the largest source of a
function deployment; the 2nd gen quota table lists no figure of its own, so
the same bound is checked before the upload rather than learnt from a
failed build.
"""
from __future__ import annotations

from ..base import Artifact, ErrorClass, FunctionSpec, ProviderError, UploadPlan

SOURCE_LIMIT = 100 * 1000 * 1000
LIMIT_SOURCE = "Cloud Functions' maximum source size (100 MB compressed)"


def check_source_size(spec: FunctionSpec, artifact: Artifact, cluster: str) -> None:
    if len(artifact.data) > SOURCE_LIMIT:
        raise ProviderError(
            ErrorClass.PAYLOAD_TOO_LARGE,
            f"{spec.name} on Cloud Functions cluster {cluster}: the source zip is {len(artifact.data)} "
            f"bytes, over {LIMIT_SOURCE} of {SOURCE_LIMIT} bytes", status=413)


def upload_plan(spec: FunctionSpec, artifact: Artifact, *, cluster: str, target: str,
                python_runtime: str) -> UploadPlan:
    return UploadPlan(cluster=cluster, function=spec.name, platform="gcf", target=target,
                      what=f"source zip with requirements.txt ({artifact.runtime}) built on {python_runtime}",
                      bytes=len(artifact.data), limit_bytes=SOURCE_LIMIT, limit_source=LIMIT_SOURCE,
                      runtime=artifact.runtime)
