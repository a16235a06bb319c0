"""Google Cloud Functions (2nd gen) through the official v2 client.

Control plane: `google.cloud.functions_v2.FunctionServiceClient` with the
cluster's service account (REST transport when an endpoint override is
configured, so private endpoints and local fakes work the same way).
Deploy = the bound configuration into Secret Manager (secrets.py),
generateUploadUrl, PUT of the source zip to the signed URL, create/update,
wait on the long-running operation.

Data plane: a function is an HTTPS endpoint. Invocations are POSTs with an ID
token, sent by the shared non-blocking HTTP invoker; tracking only collects
finished requests.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Mapping
from urllib.parse import urlsplit

import requests
from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.protobuf import field_mask_pb2

from ..base import Artifact, DeployResult, ErrorClass, FunctionSpec, ProviderContext, ProviderError, UploadPlan
from ..http_provider import HttpFunctionProvider
from . import packaging
from .auth import IdTokenCache, control_plane_credentials
from .errors import google_status_hook, map_api_error
from .prices import DEFAULT_PRICES
from .secrets import BoundSecrets

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-central1"
DEFAULT_RUNTIME = "python311"
#: label holding the artifact hash. Label values allow at most 63 characters
#: from [a-z0-9_-], so the 64-hex-digit sha256 is cut to 32 digits (128 bits,
#: far more than needed to notice a changed source).
SHA_LABEL = "fk-sha"
SHA_LABEL_CHARS = 32
#: the logical function name (may contain underscores; ids may not)
NAME_LABEL = "fk-function"
#: HTTP functions on Cloud Functions 2nd gen accept at most 32 MiB per request
MAX_REQUEST_BYTES = 32 * 1024 * 1024
#: extra time on top of the function's own timeout before the keeper gives up
#: on an HTTP answer (TLS setup, queueing in the front end, cold start)
INVOKE_GRACE_S = 10.0
#: bound on waiting for a create/update/delete operation
OPERATION_TIMEOUT_S = 900.0
RPC_TIMEOUT_S = 60.0

_ID_RE = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"[^a-z0-9_-]")


def function_id(name: str) -> str:
    """Cloud Functions 2nd gen ids are DNS labels: lower-case letters, digits
    and hyphens, starting with a letter. FedKeeper's names use underscores."""
    fid = name.lower().replace("_", "-")
    if not _ID_RE.match(fid):
        raise ProviderError(ErrorClass.PLATFORM_ERROR,
                            f"function name {name!r} cannot be a Cloud Functions id "
                            "(letters, digits, '-' or '_', starting with a letter, at most 63)")
    return fid


def label_value(text: str) -> str:
    return _LABEL_VALUE_RE.sub("-", text.lower())[:63]


def memory_string(mb: int) -> str:
    # "M" is one of the units the service accepts for available_memory.
    return f"{int(mb)}M"


def whole_cpus_for(memory_mb: float) -> int:
    """The vCPUs Cloud Functions gives a function of this memory by default,
    at least one: its tiers (2 GiB 1, 4 and 8 GiB 2, 16 GiB 4, 32 GiB 8)
    are what the service accepts, where 1 vCPU with more than 4 GiB is
    refused."""
    for limit_mb, cpus in ((2048, 1), (8192, 2), (16384, 4)):
        if memory_mb <= limit_mb:
            return cpus
    return 8


_MEM_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def memory_bytes(text: str) -> int | None:
    """available_memory as bytes, so "1024M" read back as another spelling of
    the same size does not count as a change."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(k|M|G|Ki|Mi|Gi)?\s*", text or "")
    if not m:
        return None
    return int(float(m.group(1)) * _MEM_UNITS[m.group(2) or ""])


class CloudFunctionsProvider(HttpFunctionProvider):
    platform = "gcf"
    entry = "http"
    default_prices = DEFAULT_PRICES
    status_hook = staticmethod(google_status_hook)
    no_metrics_note = ("Cloud Functions has no Prometheus source: its request counts and latencies "
                       "are in Cloud Monitoring")
    max_request_bytes = MAX_REQUEST_BYTES

    #: retry for idempotent control-plane reads; bounded so that a dead
    #: endpoint fails in seconds, not in the client's default minutes
    read_retry = gretry.Retry(initial=0.2, maximum=2.0, multiplier=2.0, timeout=10.0,
                              predicate=gretry.if_exception_type(gexc.ServiceUnavailable))
    operation_timeout_s = OPERATION_TIMEOUT_S
    invoke_grace_s = INVOKE_GRACE_S

    def __init__(self, cluster_name: str, cluster: Any, ctx: ProviderContext):
        super().__init__(cluster_name, cluster, ctx)
        self._client = None
        self._client_lock = threading.Lock()
        self._tokens: IdTokenCache | None = None
        self._secrets: BoundSecrets | None = None

    @classmethod
    def plan_upload(cls, cluster_name: str, cluster: Any, spec: FunctionSpec,
                    artifact: Artifact) -> UploadPlan:
        project = getattr(cluster, "project", None) or "<project>"
        region = getattr(cluster, "region", None) or DEFAULT_REGION
        fid = function_id(spec.name)
        target = (f"the local functions-framework host ({fid})" if getattr(cluster, "kind", "remote") == "local"
                  else f"projects/{project}/locations/{region}/functions/{fid}")
        return packaging.upload_plan(spec, artifact, cluster=cluster_name, target=target,
                                     python_runtime=spec.runtime or DEFAULT_RUNTIME)

    @property
    def project(self) -> str:
        p = getattr(self.cluster, "project", None)
        if not p:
            raise ProviderError(ErrorClass.AUTH, f"cluster {self.cluster_name}: no Google project "
                                "configured (project, or a base_url naming it)")
        return p

    @property
    def region(self) -> str:
        return getattr(self.cluster, "region", None) or DEFAULT_REGION

    def _parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    def _resource(self, name: str) -> str:
        return f"{self._parent()}/functions/{function_id(name)}"

    # -------------------------------------------------------------- client

    def _official_client(self, client_class, endpoint: str | None):
        """An official Google client with the cluster's service account; REST
        towards `endpoint` when the cluster overrides that API's endpoint."""
        info = self.cluster.service_account_info()
        if not info:
            raise ProviderError(ErrorClass.AUTH, f"cluster {self.cluster_name}: no "
                                "service-account credentials (auth or auth_file)")
        creds = control_plane_credentials(info)
        if endpoint:
            # The REST transport keeps an explicit http:// or https://
            # scheme from the endpoint; the gRPC one would not.
            return client_class(credentials=creds, transport="rest", client_options={"api_endpoint": endpoint})
        return client_class(credentials=creds)

    def client(self):
        """The official Cloud Functions client, created on first use."""
        with self._client_lock:
            if self._client is None:
                from google.cloud import functions_v2
                self._client = self._official_client(functions_v2.FunctionServiceClient,
                                                     getattr(self.cluster, "api_endpoint", None))
            return self._client

    def secrets(self) -> BoundSecrets:
        """The project's Secret Manager, where bound configuration goes."""
        with self._client_lock:
            if self._secrets is None:
                from google.cloud import secretmanager_v1
                endpoint = getattr(self.cluster, "secret_manager_endpoint", None)
                self._secrets = BoundSecrets(self.project, self.region, lambda: self._official_client(
                    secretmanager_v1.SecretManagerServiceClient, endpoint))
            return self._secrets

    def _get(self, name: str):
        """The Function message, or None when it does not exist."""
        try:
            return self.client().get_function(request={"name": self._resource(name)},
                                               retry=self.read_retry, timeout=RPC_TIMEOUT_S)
        except gexc.NotFound:
            return None
        except Exception as exc:
            raise map_api_error(exc, f"get function {name}") from None

    def _wait(self, op, what: str):
        from google.api_core.future import polling
        polling_retry = polling.DEFAULT_POLLING.with_delay(initial=0.5, maximum=10.0,
                                                           multiplier=1.5) \
            .with_timeout(self.operation_timeout_s)
        try:
            return op.result(timeout=self.operation_timeout_s, polling=polling_retry)
        except Exception as exc:
            raise map_api_error(exc, what) from None

    # -------------------------------------------------------------- deploy

    def _desired(self, spec: FunctionSpec, artifact: Artifact, secret_env: list, storage_source=None):
        from google.cloud import functions_v2
        build = functions_v2.BuildConfig(runtime=spec.runtime or DEFAULT_RUNTIME,
                                         entry_point=spec.extra.get("entry_point") or spec.name)
        if storage_source is not None:
            build.source = functions_v2.Source(storage_source=storage_source)
        # Bound configuration only as secrets (secrets.py): none of it in the
        # plain variables, which anyone who may view the function can read,
        # but for empty values, which are no secret and no secret can hold.
        service = functions_v2.ServiceConfig(
            available_memory=memory_string(spec.memory_mb),
            timeout_seconds=int(round(spec.timeout_s)),
            environment_variables={k: v for k, v in spec.bound.items() if v == ""},
            secret_environment_variables=secret_env,
            all_traffic_on_latest_revision=True)
        max_instances = spec.extra.get("max_instances")
        if max_instances:
            service.max_instance_count = int(max_instances)
        if spec.concurrency > 1:
            # 2nd gen serves several requests per instance only with a whole
            # vCPU; asking for concurrency without it is rejected.
            service.max_instance_request_concurrency = int(spec.concurrency)
            service.available_cpu = str(spec.extra.get("cpu") or whole_cpus_for(spec.memory_mb))
        elif spec.extra.get("cpu"):
            service.available_cpu = str(spec.extra["cpu"])
        labels = {SHA_LABEL: artifact.sha256[:SHA_LABEL_CHARS], NAME_LABEL: label_value(spec.name)}
        return functions_v2.Function(
            name=self._resource(spec.name), build_config=build, service_config=service,
            labels=labels, environment=functions_v2.Environment.GEN_2,
            description=f"FedKeeper function {spec.name}")

    #: fields written on update; everything else (IAM, VPC...) stays as the
    #: operator set it
    UPDATE_MASK = ("build_config.runtime", "build_config.entry_point", "build_config.source",
                   "service_config.available_memory", "service_config.available_cpu",
                   "service_config.timeout_seconds", "service_config.environment_variables",
                   "service_config.secret_environment_variables", "service_config.max_instance_count",
                   "service_config.max_instance_request_concurrency", "labels", "description")

    @staticmethod
    def _unchanged(current, desired) -> bool:
        from google.cloud import functions_v2
        if current.state != functions_v2.Function.State.ACTIVE:
            return False
        if dict(current.labels).get(SHA_LABEL) != desired.labels[SHA_LABEL]:
            return False
        cs, ds = current.service_config, desired.service_config
        cb, db = current.build_config, desired.build_config
        # The service adds variables of its own (LOG_EXECUTION_ID): compare
        # ours, and notice ones we no longer bind.
        cur_env, want_env = dict(cs.environment_variables), dict(ds.environment_variables)
        ours = {k: v for k, v in cur_env.items() if k.startswith("FK_") or k in want_env}

        def pins(config) -> set[tuple[str, str, str]]:
            return {(e.key, e.secret, e.version) for e in config.secret_environment_variables}
        return (cb.runtime == db.runtime and cb.entry_point == db.entry_point
                and pins(cs) == pins(ds)
                and memory_bytes(cs.available_memory) == memory_bytes(ds.available_memory)
                and cs.timeout_seconds == ds.timeout_seconds
                and ours == want_env
                and (not ds.max_instance_count or cs.max_instance_count == ds.max_instance_count)
                and max(1, cs.max_instance_request_concurrency)
                == max(1, ds.max_instance_request_concurrency))

    def _upload(self, artifact: Artifact):
        try:
            up = self.client().generate_upload_url(request={"parent": self._parent()},
                                                   timeout=RPC_TIMEOUT_S)
        except Exception as exc:
            raise map_api_error(exc, "generate upload URL") from None
        try:
            # A signed URL: the signature is the authorization, so no
            # Authorization header; the service requires this content type.
            r = requests.put(up.upload_url, data=artifact.data,
                             headers={"Content-Type": "application/zip"}, timeout=(10, 300))
        except requests.exceptions.RequestException as exc:
            # Not the exception's text: it quotes the signed URL, whose
            # signature is a (short-lived) credential.
            raise ProviderError(ErrorClass.UNREACHABLE,
                                f"source upload failed: {type(exc).__name__} "
                                f"(to {urlsplit(up.upload_url).hostname})") from None
        if r.status_code >= 300:
            cls = (ErrorClass.AUTH if r.status_code in (401, 403) else
                   ErrorClass.PAYLOAD_TOO_LARGE if r.status_code == 413 else
                   ErrorClass.THROTTLED if r.status_code == 429 else ErrorClass.PLATFORM_ERROR)
            raise ProviderError(cls, f"source upload answered HTTP {r.status_code}",
                                status=r.status_code)
        return up.storage_source

    def deploy(self, spec: FunctionSpec, artifact: Artifact) -> DeployResult:
        t0 = time.monotonic()
        self._require_entry(artifact)
        current = self._get(spec.name)
        secret_env, replaced = self.secrets().pin(function_id(spec.name), label_value(spec.name), spec.bound)
        desired = self._desired(spec, artifact, secret_env)
        if current is not None and self._unchanged(current, desired):
            url = current.service_config.uri or current.url
            self._remember(spec.name, url, spec.timeout_s)
            return DeployResult(spec.name, skipped=True, seconds=time.monotonic() - t0, url=url)
        packaging.check_source_size(spec, artifact, self.cluster_name)
        storage = self._upload(artifact)
        desired = self._desired(spec, artifact, secret_env, storage)
        client = self.client()
        try:
            if current is None:
                op = client.create_function(request={"parent": self._parent(), "function": desired,
                                                     "function_id": function_id(spec.name)},
                                            timeout=RPC_TIMEOUT_S)
            else:
                mask = field_mask_pb2.FieldMask(paths=list(self.UPDATE_MASK))
                op = client.update_function(request={"function": desired, "update_mask": mask},
                                            timeout=RPC_TIMEOUT_S)
        except Exception as exc:
            raise map_api_error(exc, f"deploy {spec.name}") from None
        fn = self._wait(op, f"deploy {spec.name}")
        url = fn.service_config.uri or fn.url
        if not url:
            raise ProviderError(ErrorClass.PLATFORM_ERROR,
                                f"deployed {spec.name} but the service reported no URL")
        self._remember(spec.name, url, spec.timeout_s)
        # the function runs on the new versions: the values they replaced can go
        self.secrets().destroy(replaced)
        log.info("deployed %s on %s (%s)", spec.name, self.cluster_name,
                 "created" if current is None else "updated")
        return DeployResult(spec.name, skipped=False, seconds=time.monotonic() - t0, url=url)

    def remove(self, name: str) -> bool:
        self._urls.pop(name, None)
        try:
            op = self.client().delete_function(request={"name": self._resource(name)},
                                               timeout=RPC_TIMEOUT_S)
        except gexc.NotFound:
            op = None
        except Exception as exc:
            raise map_api_error(exc, f"remove {name}") from None
        if op is not None:
            self._wait(op, f"remove {name}")
        # its secrets too, also those a deploy that failed after writing them left
        secrets = self.secrets().remove(label_value(name))
        return op is not None or secrets > 0

    def exists(self, name: str) -> bool:
        return self._get(name) is not None

    def list_functions(self) -> list[str]:
        """Ids of the functions in the project's region (diagnostics)."""
        try:
            return [f.name.rsplit("/", 1)[-1] for f in
                    self.client().list_functions(request={"parent": self._parent()},
                                                 timeout=RPC_TIMEOUT_S)]
        except Exception as exc:
            raise map_api_error(exc, "list functions") from None

    # -------------------------------------------------------------- invoke

    def _auth_headers(self, url: str) -> Mapping[str, str]:
        # runs on invoker threads: one cache for all of them
        with self._client_lock:
            if self._tokens is None:
                self._tokens = IdTokenCache(self.cluster.service_account_info())
            tokens = self._tokens
        return tokens.headers(url)

    def _lookup_url(self, name: str) -> tuple[str, float | None]:
        fn = self._get(name)
        if fn is None:
            raise ProviderError(ErrorClass.FUNCTION_MISSING,
                                f"function {name} is not deployed on {self.cluster_name}", status=404)
        url = fn.service_config.uri or fn.url
        if not url:
            raise ProviderError(ErrorClass.PLATFORM_ERROR, f"function {name} has no URL yet "
                                f"(state {fn.state.name})")
        return url, fn.service_config.timeout_seconds or None

    def limits(self) -> dict[str, Any]:
        return {"max_request_bytes": MAX_REQUEST_BYTES, "max_timeout_s": 3600,
                "max_in_flight": self._max_workers()}

    def close(self) -> None:
        super().close()
        if self._tokens is not None:
            self._tokens.close()
        with self._client_lock:
            client, self._client = self._client, None
            secrets, self._secrets = self._secrets, None
        if secrets is not None:
            secrets.close()
        if client is not None:
            try:
                client.transport.close()
            except Exception:  # closing must never mask the keeper's own error
                pass
