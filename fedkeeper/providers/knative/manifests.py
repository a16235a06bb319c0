"""The Kubernetes objects one FedKeeper function becomes on Knative.

  Service    serving.knative.dev/v1, named after the function (DNS-1035)
  ConfigMap  <service>-source-<hash>: the function's source zip
             (binaryData), mounted read-only into the generic runtime
             image; absent when the function names a prebuilt image
  Secret     <service>-bound-<hash>: the bound configuration (store URL,
             token secret...), read by the container through env valueFrom,
             so that no secret value sits in the Service spec

Both are named by their content and immutable: a new zip or new values are
new objects that only the new revision names, so pods of the revision still
serving (a cold start during a rollout, or a rollout that never becomes
Ready) keep reading the code and values they were made with. Earlier ones
are deleted once the new revision is Ready.

Pure functions only: nothing here talks to the API server, so the shapes
can be checked without one.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any, Mapping

from ...runtimes.images import runtime_image
from ..base import Artifact, ErrorClass, FunctionSpec, ProviderError, UploadPlan

GROUP, VERSION, PLURAL = "serving.knative.dev", "v1", "services"
API_VERSION = f"{GROUP}/{VERSION}"

FUNCTION_LABEL = "fedkeeper.io/function"
MANAGED_BY = {"app.kubernetes.io/managed-by": "fedkeeper"}
SOURCE_ANNOTATION = "fedkeeper.io/source-sha256"
# on the revision template when a failed rollout of an unchanged configuration is tried again
RETRY_ANNOTATION = "fedkeeper.io/retried-at-ns"
CONFIG_ANNOTATION = "fedkeeper.io/config-hash"
MIN_SCALE = "autoscaling.knative.dev/min-scale"
MAX_SCALE = "autoscaling.knative.dev/max-scale"
SCALE_ANNOTATIONS = (MIN_SCALE, MAX_SCALE, "autoscaling.knative.dev/target")

#: where the generic runtime image finds the zip and where it unpacks it
SOURCE_MOUNT = "/fk/source"
SOURCE_KEY = "source.zip"
UNPACK_DIR = "/tmp/fk-function"
CONTAINER_NAME = "function"
#: The generic image's command: unpack the mounted zip with Python's own
#: zipfile CLI, then serve main.py with functions-framework on $PORT (set
#: by Knative, 8080 by default). The target comes from FUNCTION_TARGET,
#: which functions-framework reads itself. `exec` makes functions-framework
#: PID 1's successor so that it receives Knative's SIGTERM.
GENERIC_COMMAND = ["/bin/sh", "-c",
                   f'set -e; rm -rf {UNPACK_DIR}; python -m zipfile -e "{SOURCE_MOUNT}/{SOURCE_KEY}" '
                   f'{UNPACK_DIR}; cd {UNPACK_DIR}; exec python -m functions_framework '
                   '--target "$FUNCTION_TARGET" --source main.py --signature-type http '
                   '--host 0.0.0.0 --port "${PORT:-8080}"']

#: a ConfigMap holds at most 1 MiB of data (the API server refuses more);
#: base64 is the wire encoding, the limit counts the decoded bytes. Keep a
#: little room for the object's metadata.
CONFIGMAP_LIMIT = 1024 * 1024
CONFIGMAP_HEADROOM = 8 * 1024

_DNS1035_MAX = 63
#: Knative names revisions <service>-00001; the revision name must stay a
#: DNS-1035 label too, so the service name leaves room for that suffix
SERVICE_NAME_MAX = _DNS1035_MAX - 6
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?\Z")


def service_name(function: str) -> str:
    """fl_client -> fl-client: a DNS-1035 label (lower case letters, digits
    and '-', starting with a letter, ending with a letter or digit). A name
    that had to be shortened gets a short hash so that two long names stay
    apart."""
    base = re.sub(r"[^a-z0-9-]+", "-", function.lower()).strip("-")
    base = re.sub(r"-{2,}", "-", base)
    if not base or not base[0].isalpha():
        base = f"fn-{base}".rstrip("-")
    if len(base) > SERVICE_NAME_MAX:
        digest = hashlib.sha256(function.encode()).hexdigest()[:8]
        base = f"{base[:SERVICE_NAME_MAX - 9].rstrip('-')}-{digest}"
    return base


def label_value(text: str) -> str:
    """A label value that keeps the logical name where it is valid."""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")[:54]
    return f"{cleaned}-{hashlib.sha256(text.encode()).hexdigest()[:8]}".strip("-")


#: hex digits of the content hash in a ConfigMap's or Secret's name
NAME_HASH_CHARS = 12


def configmap_name(service: str, artifact_sha256: str) -> str:
    return f"{service}-source-{artifact_sha256[:NAME_HASH_CHARS]}"


def secret_name(service: str, bound: Mapping[str, str]) -> str:
    return f"{service}-bound-{bound_digest(bound)[:NAME_HASH_CHARS]}"


def function_selector(function: str) -> str:
    """The label selector of every object of `function`."""
    return f"{FUNCTION_LABEL}={label_value(function)}"


def _quantity_cpu(value: Any) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?m?", text):
        raise ProviderError(ErrorClass.DEVELOPER_ERROR,
                            f"cpu {value!r} is not a Kubernetes CPU quantity (e.g. 500m or 1)")
    return text


def _scale(value: Any, what: str) -> str:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise ProviderError(ErrorClass.DEVELOPER_ERROR, f"{what} must be a whole number >= 0, "
                            f"got {value!r}")
    return str(n)


def check_bound(bound: Mapping[str, str]) -> None:
    for key in bound:
        # env names and Secret keys both; never echo the value
        if not _ENV_NAME.match(key):
            raise ProviderError(ErrorClass.DEVELOPER_ERROR,
                                f"bound key {key!r} is not a valid environment variable name")


def bound_digest(bound: Mapping[str, str]) -> str:
    """A digest of the bound values, so that a changed secret rolls out a new
    revision (env from a Secret is read only when a container starts). All
    values go into one digest: the token secret's entropy protects the
    low-entropy ones (a database name) from being guessed back."""
    return hashlib.sha256(json.dumps(dict(bound), sort_keys=True).encode()).hexdigest()


def check_source_size(artifact: Artifact, function: str, cluster: str = "") -> None:
    limit = CONFIGMAP_LIMIT - CONFIGMAP_HEADROOM
    if len(artifact.data) > limit:
        where = f" on Knative cluster {cluster}" if cluster else ""
        raise ProviderError(
            ErrorClass.PAYLOAD_TOO_LARGE,
            f"{function}{where}: the source zip is {len(artifact.data)} bytes, over the {limit} bytes "
            f"a ConfigMap can carry (Kubernetes caps one at {CONFIGMAP_LIMIT} bytes, 1 MiB, less room "
            f"for its metadata). Build an image with the function and name it "
            f"(functions.{function}.knative.docker_image), or slim the source", status=413)


def container_image(spec: FunctionSpec, artifact: Artifact, generic_image: str | None,
                    image_prefix: str | None) -> tuple[str | None, bool]:
    """(image, prebuilt): the function's own image (code baked in), else
    the cluster's generic image, else its runtime's Knative image; the
    latter two get the code from the source ConfigMap."""
    if spec.image:
        return spec.image, True
    if generic_image:
        return generic_image, False
    if artifact.runtime:
        return runtime_image(artifact.runtime, "knative", image_prefix), False
    return None, False


def upload_plan(spec: FunctionSpec, artifact: Artifact, *, cluster: str, namespace: str,
                generic_image: str | None, image_prefix: str | None) -> UploadPlan:
    image, prebuilt = container_image(spec, artifact, generic_image, image_prefix)
    svc = service_name(spec.name)
    if prebuilt:
        return UploadPlan(cluster=cluster, function=spec.name, platform="knative",
                          target=f"namespace {namespace}, service {svc}",
                          what=f"Knative Service on {image} (code in the image)", bytes=0,
                          runtime=artifact.runtime, image=image)
    return UploadPlan(cluster=cluster, function=spec.name, platform="knative",
                      target=f"namespace {namespace}, service {svc}, "
                             f"ConfigMap {configmap_name(svc, artifact.sha256)}",
                      what=f"Knative Service on {image or '(no image)'}, source zip in a ConfigMap",
                      bytes=len(artifact.data), limit_bytes=CONFIGMAP_LIMIT - CONFIGMAP_HEADROOM,
                      limit_source="Kubernetes' 1 MiB ConfigMap limit, less metadata room",
                      runtime=artifact.runtime, image=image)


def desired_service(spec: FunctionSpec, artifact: Artifact, *, namespace: str,
                    generic_image: str | None, image_prefix: str | None = None) -> dict[str, Any]:
    """The Service body, with the config hash over everything in it."""
    name = service_name(spec.name)
    check_bound(spec.bound)
    image, prebuilt = container_image(spec, artifact, generic_image, image_prefix)
    if not image:
        raise ProviderError(ErrorClass.DEVELOPER_ERROR,
                            f"no container image for {spec.name}: it declares no runtime; set the "
                            "cluster's image (a Python image with functions-framework) or the "
                            "function's docker_image")
    extra = dict(spec.extra or {})
    target = str(extra.get("entry_point") or spec.name)
    env: list[dict[str, Any]] = [
        {"name": "FUNCTION_TARGET", "value": target},
        {"name": "FUNCTION_SIGNATURE_TYPE", "value": "http"},
    ]
    container: dict[str, Any] = {"name": CONTAINER_NAME, "image": image}
    volumes: list[dict[str, Any]] = []
    if not prebuilt:
        env.append({"name": "PYTHONPATH", "value": UNPACK_DIR})
        container["command"] = list(GENERIC_COMMAND)
        container["volumeMounts"] = [{"name": "fk-source", "mountPath": SOURCE_MOUNT,
                                      "readOnly": True}]
        volumes.append({"name": "fk-source", "configMap": {"name": configmap_name(name, artifact.sha256)}})
    for key in sorted(spec.bound):
        env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret_name(name, spec.bound),
                                                                "key": key}}})
    container["env"] = env
    memory = f"{int(spec.memory_mb)}Mi"
    requests: dict[str, str] = {"memory": memory}
    limits: dict[str, str] = {"memory": memory}
    if extra.get("cpu") is not None:
        requests["cpu"] = _quantity_cpu(extra["cpu"])
    if extra.get("cpu_limit") is not None:
        limits["cpu"] = _quantity_cpu(extra["cpu_limit"])
    container["resources"] = {"requests": requests, "limits": limits}

    template_annotations: dict[str, str] = {}
    if extra.get("min_scale") is not None:
        template_annotations[MIN_SCALE] = _scale(extra["min_scale"], "min_scale")
    if extra.get("max_scale") is not None:
        template_annotations[MAX_SCALE] = _scale(extra["max_scale"], "max_scale")
    pod_spec: dict[str, Any] = {
        "containerConcurrency": max(0, int(spec.concurrency)),
        "timeoutSeconds": max(1, int(round(spec.timeout_s))),
        "containers": [container],
    }
    if volumes:
        pod_spec["volumes"] = volumes
    labels = {FUNCTION_LABEL: label_value(spec.name), **MANAGED_BY}
    service_labels = dict(labels)
    if extra.get("visibility") == "cluster-local":
        service_labels["networking.knative.dev/visibility"] = "cluster-local"
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": service_labels,
                     "annotations": {SOURCE_ANNOTATION: artifact.sha256}},
        "spec": {"template": {"metadata": {"labels": dict(labels),
                                           "annotations": template_annotations},
                              "spec": pod_spec}},
    }
    digest = config_hash(body, artifact, spec.bound)
    body["metadata"]["annotations"][CONFIG_ANNOTATION] = digest
    # in the template too: a new zip or new bound values must start new
    # containers, and only a template change makes Knative roll a revision
    template_annotations[CONFIG_ANNOTATION] = digest
    return body


def config_hash(body: Mapping[str, Any], artifact: Artifact, bound: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    h.update(artifact.sha256.encode())
    h.update(json.dumps(body, sort_keys=True).encode())
    h.update(bound_digest(bound).encode())
    return h.hexdigest()[:40]


def source_configmap(spec: FunctionSpec, artifact: Artifact, *, namespace: str) -> dict[str, Any]:
    name = service_name(spec.name)
    check_source_size(artifact, spec.name)
    return {
        "apiVersion": "v1", "kind": "ConfigMap", "immutable": True,
        "metadata": {"name": configmap_name(name, artifact.sha256), "namespace": namespace,
                     "labels": {FUNCTION_LABEL: label_value(spec.name), **MANAGED_BY},
                     "annotations": {SOURCE_ANNOTATION: artifact.sha256}},
        "binaryData": {SOURCE_KEY: base64.b64encode(artifact.data).decode("ascii")},
    }


def bound_secret(spec: FunctionSpec, *, namespace: str) -> dict[str, Any]:
    name = service_name(spec.name)
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": True,
        "metadata": {"name": secret_name(name, spec.bound), "namespace": namespace,
                     "labels": {FUNCTION_LABEL: label_value(spec.name), **MANAGED_BY}},
        "data": {k: base64.b64encode(str(v).encode()).decode("ascii")
                 for k, v in sorted(spec.bound.items())},
    }


def service_patch(current: Mapping[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch: lists (containers, env, volumes) are replaced
    whole; our scale annotations that are no longer wanted are nulled.
    Fields Knative's webhook defaulted (traffic, probes) stay."""
    patch = {"metadata": {k: v for k, v in desired["metadata"].items()
                          if k in ("labels", "annotations")},
             "spec": {"template": {"metadata": dict(desired["spec"]["template"]["metadata"]),
                                   "spec": desired["spec"]["template"]["spec"]}}}
    tmeta = patch["spec"]["template"]["metadata"]
    have = (((current.get("spec") or {}).get("template") or {}).get("metadata") or {}) \
        .get("annotations") or {}
    annotations = dict(tmeta.get("annotations") or {})
    for key in SCALE_ANNOTATIONS + (RETRY_ANNOTATION,):
        if key in have and key not in annotations:
            annotations[key] = None
    tmeta["annotations"] = annotations
    # the generic image's volume is gone when a prebuilt image is named
    tspec = patch["spec"]["template"]["spec"]
    have_spec = ((current.get("spec") or {}).get("template") or {}).get("spec") or {}
    if "volumes" in have_spec and "volumes" not in tspec:
        tspec["volumes"] = None
    return patch


# ------------------------------------------------------------------ status

def ready_condition(service: Mapping[str, Any]) -> dict[str, Any] | None:
    for c in (service.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c
    return None


def observed_current(service: Mapping[str, Any]) -> bool:
    """The status describes the current spec (not the one before a patch)."""
    gen = (service.get("metadata") or {}).get("generation")
    seen = (service.get("status") or {}).get("observedGeneration")
    if gen is None or seen is None:
        return gen is None  # an API server that keeps no generation: trust the status
    return int(seen) >= int(gen)


#: Ready=False reasons of the function's own making (its image, its code)
_DEVELOPER_REASONS = ("ContainerMissing", "ExitCode", "CrashLoopBackOff", "RevisionFailed",
                      "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                      "CreateContainerConfigError")


def not_ready_error(function: str, cond: Mapping[str, Any] | None, *, waited: float | None = None
                    ) -> ProviderError:
    """A classified error naming Knative's own reason and message."""
    if cond is None:
        state, reason, message = "missing", "", "no Ready condition reported"
    else:
        state = str(cond.get("status", "Unknown"))
        reason = str(cond.get("reason") or "")
        message = str(cond.get("message") or "")
    text = f"Knative service for {function} is not ready (Ready={state}"
    text += f", reason {reason}" if reason else ""
    text += f"): {message}" if message else ")"
    if waited is not None and state != "False":
        return ProviderError(ErrorClass.TIMEOUT, f"{text}; gave up after {waited:.0f}s")
    if reason == "ProgressDeadlineExceeded":
        return ProviderError(ErrorClass.TIMEOUT, text)
    if any(reason.startswith(r) for r in _DEVELOPER_REASONS):
        return ProviderError(ErrorClass.DEVELOPER_ERROR, text)
    return ProviderError(ErrorClass.PLATFORM_ERROR, text)
