"""A local stand-in for the Cloud Functions v2 REST API (and the pieces of
Google around it that a deployment touches), for driving the official client
in tests without a cloud account.

Implemented, following the public REST reference and the JSON the
google-cloud-functions library parses (camelCase fields, enum names as
strings, google.longrunning.Operation with typed Any payloads, Google's
error body {"error": {"code", "message", "status"}}):
  POST   /v2/{parent}/functions:generateUploadUrl  -> uploadUrl + storageSource
  PUT    /upload/{object}?...                      the "signed URL" upload
  POST   /v2/{parent}/functions?functionId=ID      -> Operation (create)
  GET    /v2/{parent}/functions                    -> {functions: [...]}
  GET    /v2/{name}                                -> Function
  PATCH  /v2/{name}?updateMask=a,b                 -> Operation (update)
  DELETE /v2/{name}                                -> Operation (delete)
  GET    /v2/{parent}/operations/{op}              -> Operation
  POST   /token                                    OAuth token endpoint: the
         JWT-bearer grant answering {"id_token"} for ID-token requests (a
         `target_audience` claim) and {"access_token"} otherwise
  *      /run/{id}/...                             the deployed function: the
         bearer ID token is checked (signature, audience) and the call is
         passed to a real functions-framework process serving the uploaded zip
and of Secret Manager v1 (what secretEnvironmentVariables name):
  POST   /v1/projects/{p}/secrets?secretId=ID      -> Secret (409 if it exists)
  GET    /v1/projects/{p}/secrets[?filter=labels.K=V] -> {secrets: [...]}
  DELETE /v1/projects/{p}/secrets/{id}             -> {}
  POST   /v1/projects/{p}/secrets/{id}:addVersion  -> SecretVersion (an empty payload is refused)
  GET    /v1/projects/{p}/secrets/{id}/versions/{v|latest}:access -> {name, payload}
         (FAILED_PRECONDITION for a destroyed version)
  POST   /v1/projects/{p}/secrets/{id}/versions/{v}:destroy -> SecretVersion
  the list filter takes `labels.K=V` terms joined by AND.
Operations finish on their first poll, as a quick deployment would. A
function's secretEnvironmentVariables are resolved when it is served: a
secret or version that does not exist fails the deploy, as on the service.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import socket
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import crypt, jwt

from fedkeeper.local.cloud_functions.host import FrameworkHost, HostError

TYPE_PREFIX = "type.googleapis.com/"
FUNCTION_TYPE = TYPE_PREFIX + "google.cloud.functions.v2.Function"
METADATA_TYPE = TYPE_PREFIX + "google.cloud.functions.v2.OperationMetadata"
EMPTY_TYPE = TYPE_PREFIX + "google.protobuf.Empty"
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
           404: "NOT_FOUND", 409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED",
           500: "INTERNAL", 503: "UNAVAILABLE"}
_ID_RE = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
_MEMORY_RE = re.compile(r"^[0-9]+(k|M|G|Mi|Gi)?$")


# Enum fields of the Function JSON and their numbers. The official client
# asks for numeric enums ($alt=json;enum-encoding=int) and sends numbers; the
# service answers in the encoding asked for. Stored JSON keeps the names.
_ENUMS: dict[str, list[str]] = {
    "state": ["STATE_UNSPECIFIED", "ACTIVE", "FAILED", "DEPLOYING", "DELETING", "UNKNOWN"],
    "environment": ["ENVIRONMENT_UNSPECIFIED", "GEN_1", "GEN_2"],
    "operationType": ["OPERATIONTYPE_UNSPECIFIED", "CREATE_FUNCTION", "UPDATE_FUNCTION",
                      "DELETE_FUNCTION"],
    "ingressSettings": ["INGRESS_SETTINGS_UNSPECIFIED", "ALLOW_ALL", "ALLOW_INTERNAL_ONLY",
                        "ALLOW_INTERNAL_AND_GCLB"],
    "dockerRegistry": ["DOCKER_REGISTRY_UNSPECIFIED", "CONTAINER_REGISTRY", "ARTIFACT_REGISTRY"],
    "securityLevel": ["SECURITY_LEVEL_UNSPECIFIED", "SECURE_ALWAYS", "SECURE_OPTIONAL"],
}


def convert_enums(obj: Any, numeric: bool) -> Any:
    if isinstance(obj, list):
        return [convert_enums(v, numeric) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        names = _ENUMS.get(k)
        if names is not None and isinstance(v, (int, str)) and not isinstance(v, bool):
            if numeric and isinstance(v, str) and v in names:
                v = names.index(v)
            elif not numeric and isinstance(v, int) and 0 <= v < len(names):
                v = names[v]
        else:
            v = convert_enums(v, numeric)
        out[k] = v
    return out


def _mebibytes(memory: str) -> float:
    m = re.fullmatch(r"([0-9]+)(k|M|G|Mi|Gi)?", memory)
    scale = {None: 2 ** -20, "k": 1e3 / 2 ** 20, "M": 1e6 / 2 ** 20, "G": 1e9 / 2 ** 20, "Mi": 1, "Gi": 1024}
    return int(m.group(1)) * scale[m.group(2)] if m else 0.0


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _rsa_pem() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


class _Server(ThreadingHTTPServer):
    # the stdlib default backlog of 5 resets connections when many
    # invocations arrive at once; a real front end queues them
    request_queue_size = 256


class ApiError(Exception):
    def __init__(self, code: int, message: str, status: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.message = code, message
        self.status = status or _STATUS.get(code, "UNKNOWN")
        self.headers = headers or {}


class FakeCloudFunctions:
    def __init__(self, project: str = "fk-test", region: str = "europe-west3"):
        self.project, self.region = project, region
        self.functions: dict[str, dict[str, Any]] = {}   # id -> Function JSON
        self.secrets: dict[str, dict[str, Any]] = {}     # id -> Secret JSON, with "_versions": [bytes]
        self.operations: dict[str, dict[str, Any]] = {}
        self.uploads: dict[str, bytes] = {}
        self.upload_headers: list[dict[str, str]] = []
        self.log: list[dict[str, Any]] = []               # control-plane requests
        self.token_exchanges = 0
        self.reject_invocations = False                   # answer the data plane with 403
        self._injected: list[dict[str, Any]] = []
        self._op_errors: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-gcf-")
        self.host = FrameworkHost(Path(self._tmp.name) / "hosts")
        self._proxy = requests.Session()
        self._proxy.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=64))
        sa_private, self.sa_public = _rsa_pem()
        self._idt_private, self.idt_public = _rsa_pem()
        self._idt_signer = crypt.RSASigner.from_string(self._idt_private, key_id="fake-idt")
        self._server = _Server(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.service_account = {
            "type": "service_account", "project_id": project, "private_key_id": "fake-key-1",
            "private_key": sa_private, "client_email": f"fedkeeper@{project}.iam.gserviceaccount.com",
            "client_id": "100000000000000000001", "token_uri": f"{self.base_url}/token",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        }
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "FakeCloudFunctions":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.host.stop_all()
        self._proxy.close()
        self._tmp.cleanup()

    # ------------------------------------------------------------ test hooks

    def inject_error(self, method: str, path_contains: str, code: int, message: str = "injected",
                     *, times: int = 1, headers: dict[str, str] | None = None) -> None:
        """The next `times` matching control-plane requests fail like Google would."""
        with self._lock:
            self._injected.append({"method": method.upper(), "path": path_contains, "code": code,
                                   "message": message, "times": times, "headers": headers or {}})

    def fail_next_operation(self, code: int, message: str) -> None:
        """The next long-running operation ends with this google.rpc.Status."""
        with self._lock:
            self._op_errors.append({"code": code, "message": message})

    def calls(self, method: str | None = None, contains: str = "") -> list[dict[str, Any]]:
        return [c for c in self.log if (method is None or c["method"] == method)
                and contains in c["path"]]

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    # --------------------------------------------------------------- helpers

    def _check_injected(self, method: str, path: str) -> None:
        with self._lock:
            for inj in self._injected:
                if inj["method"] == method and inj["path"] in path and inj["times"] > 0:
                    inj["times"] -= 1
                    raise ApiError(inj["code"], inj["message"], headers=inj["headers"])

    def _check_control_auth(self, headers) -> None:
        auth = headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise ApiError(401, "Request is missing required authentication credential.")
        try:
            # the client signs its own JWT with the service-account key
            jwt.decode(auth[7:], certs=self.sa_public, verify=True, clock_skew_in_seconds=30)
        except Exception:
            raise ApiError(401, "Request had invalid authentication credentials.") from None

    def _new_operation(self, verb: str, target: str, op_type: str,
                       result: dict[str, Any] | None) -> dict[str, Any]:
        op_id = f"operation-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"
        name = f"{self.parent}/operations/{op_id}"
        op = {"name": name, "done": False,
              "metadata": {"@type": METADATA_TYPE, "createTime": _now(), "target": target,
                           "verb": verb, "cancelRequested": False, "apiVersion": "v2",
                           "operationType": op_type}}
        with self._lock:
            err = self._op_errors.pop(0) if self._op_errors else None
            self.operations[op_id] = {"op": op, "result": result, "error": err}
        return op

    def _poll_operation(self, op_id: str) -> dict[str, Any]:
        with self._lock:
            rec = self.operations.get(op_id)
            if rec is None:
                raise ApiError(404, f"Operation {op_id} not found")
            op = rec["op"]
            if not op["done"]:
                op["done"] = True
                op["metadata"]["endTime"] = _now()
                if rec["error"]:
                    op["error"] = rec["error"]
                    target = op["metadata"]["target"].rsplit("/", 1)[-1]
                    if target in self.functions:
                        self.functions[target]["state"] = "FAILED"
                elif rec["result"] is None:
                    op["response"] = {"@type": EMPTY_TYPE}
                else:
                    fid = rec["result"]
                    fn = self.functions.get(fid)
                    if fn is not None:
                        fn["state"] = "ACTIVE"
                        op["response"] = {"@type": FUNCTION_TYPE, **fn}
            return op

    def _validate(self, fid: str, fn: dict[str, Any]) -> None:
        if not _ID_RE.match(fid):
            raise ApiError(400, f"Invalid function id {fid!r}: it must contain only lower case "
                                "Latin letters, digits and hyphens")
        for k, v in (fn.get("labels") or {}).items():
            if not _LABEL_KEY_RE.match(k) or not _LABEL_VALUE_RE.match(str(v)):
                raise ApiError(400, f"Invalid label {k}={v}: keys and values may hold at most 63 "
                                    "lower-case letters, digits, '_' and '-'")
        sc = fn.get("serviceConfig") or {}
        mem = sc.get("availableMemory")
        if mem is not None and not _MEMORY_RE.match(mem):
            raise ApiError(400, f"Invalid available memory {mem!r}")
        cpu = sc.get("availableCpu")
        if cpu is not None:
            # Cloud Run's floor of vCPUs for a memory size, and a whole one for concurrency
            mib = _mebibytes(mem or "256M")
            need = 8 if mib > 24 * 1024 else 6 if mib > 16 * 1024 else 4 if mib > 8 * 1024 else \
                2 if mib > 4 * 1024 else 1 if int(sc.get("maxInstanceRequestConcurrency") or 1) > 1 else 0
            if float(cpu) < need:
                raise ApiError(400, f"Invalid value specified for cpu: {cpu} vCPU with {mem} of memory; "
                                    f"at least {need} vCPU are required")
        t = int(sc.get("timeoutSeconds") or 60)
        if not 1 <= t <= 3600:
            raise ApiError(400, f"timeoutSeconds must be between 1 and 3600, got {t}")
        src = ((fn.get("buildConfig") or {}).get("source") or {}).get("storageSource") or {}
        if src.get("object") not in self.uploads:
            raise ApiError(400, "Source code is not available: upload it to the URL from "
                                "generateUploadUrl first")

    def _serve(self, fid: str, fn: dict[str, Any]) -> None:
        """Run the uploaded source like the service would, and give the
        function its URL."""
        obj = fn["buildConfig"]["source"]["storageSource"]["object"]
        data = self.uploads[obj]
        sc = fn.setdefault("serviceConfig", {})
        env = {k: v for k, v in (sc.get("environmentVariables") or {}).items()}
        # the instance's environment: the plain variables and the secrets' values, read now
        instance_env = dict(env)
        for ref in sc.get("secretEnvironmentVariables") or []:
            instance_env[ref["key"]] = self._secret_value(ref.get("projectId"), ref.get("secret"),
                                                          ref.get("version"))
        try:
            self.host.serve(fid, target=fn["buildConfig"].get("entryPoint") or fid, source_zip=data,
                            sha256=hashlib.sha256(data).hexdigest(), env=instance_env,
                            timeout_s=sc.get("timeoutSeconds"))
        except HostError as exc:
            raise ApiError(400, f"Build failed: {exc}") from None
        uri = f"{self.base_url}/run/{fid}"
        # the service adds a variable of its own
        env["LOG_EXECUTION_ID"] = "true"
        sc.update({"uri": uri, "service": f"{self.parent}/services/{fid}",
                   "revision": f"{fid}-{uuid.uuid4().hex[:5]}", "environmentVariables": env,
                   "ingressSettings": sc.get("ingressSettings", "ALLOW_ALL"),
                   "timeoutSeconds": sc.get("timeoutSeconds", 60),
                   "availableMemory": sc.get("availableMemory", "256M")})
        fn["url"] = uri

    # -------------------------------------------------------------- handlers

    def _secret_value(self, project: str | None, sid: str | None, version: str | None) -> str:
        with self._lock:
            secret = self.secrets.get(sid or "") if project in (self.project, None) else None
            versions = (secret or {}).get("_versions") or []
            n = len(versions) if version == "latest" else int(version) if str(version).isdigit() else 0
        if not 1 <= n <= len(versions) or versions[n - 1] is None:
            raise ApiError(400, f"Secret projects/{project}/secrets/{sid}/versions/{version} was not found, "
                                "is destroyed, or the runtime service account may not access it")
        return versions[n - 1].decode()

    def handle_secrets(self, method: str, path: str, query: dict[str, list[str]],
                       body: bytes) -> tuple[int, dict[str, Any]]:
        m = re.fullmatch(r"/v1/projects/([^/]+)/secrets(?:/([A-Za-z0-9_-]{1,255}))?"
                         r"(?::(addVersion)|/versions/([0-9]+|latest):(access|destroy))?", path)
        if not m or m.group(1) != self.project:
            raise ApiError(404, f"Requested entity was not found: {path}")
        sid, add, version, verb = m.group(2), m.group(3), m.group(4), m.group(5)
        access = verb == "access"
        parent = f"projects/{self.project}/secrets"
        payload = json.loads(body) if body else {}
        with self._lock:
            if sid is None and method == "POST":
                new = (query.get("secretId") or [""])[0]
                if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", new):
                    raise ApiError(400, f"Invalid secret id {new!r}")
                if new in self.secrets:
                    raise ApiError(409, f"Secret [{parent}/{new}] already exists.")
                self.secrets[new] = {"name": f"{parent}/{new}", "createTime": _now(),
                                     "replication": payload.get("replication") or {},
                                     "labels": payload.get("labels") or {}, "_versions": []}
                return 200, self._public(self.secrets[new])
            if sid is None and method == "GET":
                terms = [t.strip().partition("=") for t in (query.get("filter") or [""])[0].split(" AND ")
                         if t.strip()]
                if any(not k.startswith("labels.") for k, _, _ in terms):
                    raise ApiError(400, "the fake filters by labels only")
                found = [s for s in self.secrets.values() if all(s["labels"].get(k[7:]) == v for k, _, v in terms)]
                return 200, {"secrets": [self._public(s) for s in found], "totalSize": len(found)}
            secret = self.secrets.get(sid or "")
            if secret is None:
                raise ApiError(404, f"Secret [{parent}/{sid}] not found.")
            if add and method == "POST":
                data = base64.b64decode((payload.get("payload") or {}).get("data") or "")
                if not data:
                    raise ApiError(400, "Field [payload] is required and may not be empty.")
                secret["_versions"].append(data)
                return 200, {"name": f"{secret['name']}/versions/{len(secret['_versions'])}",
                             "state": "ENABLED", "createTime": _now()}
            if verb:
                n = len(secret["_versions"]) if version == "latest" else int(version)
                if not 1 <= n <= len(secret["_versions"]):
                    raise ApiError(404, f"Secret Version [{secret['name']}/versions/{version}] not found.")
                vname = f"{secret['name']}/versions/{n}"
                if verb == "destroy" and method == "POST":
                    secret["_versions"][n - 1] = None   # its data is gone for good
                    return 200, {"name": vname, "state": "DESTROYED", "createTime": _now()}
                if access and method == "GET":
                    data = secret["_versions"][n - 1]
                    if data is None:
                        raise ApiError(400, f"Secret Version [{vname}] is in DESTROYED state.",
                                       status="FAILED_PRECONDITION")
                    return 200, {"name": vname, "payload": {"data": base64.b64encode(data).decode()}}
            if method == "DELETE" and not add and not verb:
                del self.secrets[sid]
                return 200, {}
        raise ApiError(405, f"Method {method} not allowed")

    @staticmethod
    def _public(secret: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in secret.items() if not k.startswith("_")}

    def handle_api(self, method: str, path: str, query: dict[str, list[str]], headers,
                   body: bytes) -> tuple[int, dict[str, Any]]:
        self.log.append({"method": method, "path": path, "query": query,
                         "api_client": headers.get("x-goog-api-client", ""),
                         "user_agent": headers.get("User-Agent", "")})
        self._check_control_auth(headers)
        self._check_injected(method, path)
        if path.startswith("/v1/"):
            return self.handle_secrets(method, path, query, body)
        m = re.fullmatch(r"/v2/projects/([^/]+)/locations/([^/]+)/(functions|operations)(?:/([^/:]+))?"
                         r"(:generateUploadUrl)?", path)
        if not m or m.group(1) != self.project or m.group(2) != self.region:
            raise ApiError(404, f"Requested entity was not found: {path}")
        kind, item, custom = m.group(3), m.group(4), m.group(5)
        payload = convert_enums(json.loads(body), numeric=False) if body else {}
        if kind == "operations" and method == "GET" and item:
            return 200, self._poll_operation(item)
        if kind != "functions":
            raise ApiError(404, "Requested entity was not found.")
        if custom and method == "POST" and not item:
            obj = f"{self.parent.replace('/', '-')}/{uuid.uuid4()}.zip"
            return 200, {"uploadUrl": f"{self.base_url}/upload/{obj}?GoogleAccessId=fake&"
                                      f"Expires={int(time.time()) + 1800}&Signature=fake",
                         "storageSource": {"bucket": f"gcf-v2-uploads-000000000000-{self.region}",
                                           "object": obj}}
        if item is None and method == "GET":
            with self._lock:
                return 200, {"functions": list(self.functions.values())}
        if item is None and method == "POST":
            fid = (query.get("functionId") or [""])[0]
            with self._lock:
                if fid in self.functions:
                    raise ApiError(409, f"Function {fid} in region {self.region} in project "
                                        f"{self.project} already exists")
            fn = dict(payload)
            self._validate(fid, fn)
            fn["name"] = f"{self.parent}/functions/{fid}"
            fn.update({"state": "DEPLOYING", "environment": fn.get("environment", "GEN_2"),
                       "createTime": _now(), "updateTime": _now()})
            fn.setdefault("buildConfig", {})["dockerRegistry"] = "ARTIFACT_REGISTRY"
            self._serve(fid, fn)
            with self._lock:
                self.functions[fid] = fn
            return 200, self._new_operation("create", fn["name"], "CREATE_FUNCTION", fid)
        with self._lock:
            cur = self.functions.get(item)
        if cur is None:
            raise ApiError(404, f"Function {item} does not exist")
        if method == "GET":
            return 200, cur
        if method == "PATCH":
            mask = [p for p in ",".join(query.get("updateMask") or []).split(",") if p]
            new = json.loads(json.dumps(cur))
            if not mask:
                new.update(payload)
            for p in mask:
                parts = p.split(".")
                src, dst = payload, new
                for part in parts[:-1]:
                    src = src.get(part, {}) if isinstance(src, dict) else {}
                    dst = dst.setdefault(part, {})
                if isinstance(src, dict) and parts[-1] in src:
                    dst[parts[-1]] = src[parts[-1]]
                else:
                    dst.pop(parts[-1], None)
            self._validate(item, new)
            new.update({"state": "DEPLOYING", "updateTime": _now()})
            self._serve(item, new)
            with self._lock:
                self.functions[item] = new
            return 200, self._new_operation("update", new["name"], "UPDATE_FUNCTION", item)
        if method == "DELETE":
            with self._lock:
                self.functions.pop(item, None)
            self.host.stop(item)
            return 200, self._new_operation("delete", cur["name"], "DELETE_FUNCTION", None)
        raise ApiError(405, f"Method {method} not allowed")

    def handle_token(self, body: bytes) -> tuple[int, dict[str, Any]]:
        self._check_injected("POST", "/token")   # inject_error("POST", "/token", 503): an outage
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return 400, {"error": "unsupported_grant_type"}
        try:
            # google-auth addresses ID-token assertions to Google's token
            # endpoint whatever token_uri says; access-token ones to token_uri
            claims = jwt.decode(form.get("assertion", ""), certs=self.sa_public,
                                audience=[self.service_account["token_uri"],
                                          "https://oauth2.googleapis.com/token"],
                                clock_skew_in_seconds=30)
        except Exception as exc:
            return 400, {"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}"}
        with self._lock:
            self.token_exchanges += 1
        now = int(time.time())
        if "target_audience" in claims:
            token = jwt.encode(self._idt_signer, {
                "iss": "https://accounts.google.com", "aud": claims["target_audience"],
                "azp": claims["iss"], "email": claims["iss"], "email_verified": True,
                "sub": self.service_account["client_id"], "iat": now, "exp": now + 3600})
            return 200, {"id_token": token.decode()}
        return 200, {"access_token": f"ya29.fake-{uuid.uuid4().hex}", "expires_in": 3599,
                     "token_type": "Bearer"}

    def check_invoker(self, fid: str, headers) -> tuple[int, str] | None:
        """The front end's IAM check: a valid ID token for this function's URL."""
        fn = self.functions.get(fid)
        if fn is None:
            return 404, "<html><body>404 Page not found</body></html>"
        if self.reject_invocations:
            return 403, ("<html><body><h1>Error: Forbidden</h1><h2>Your client does not have "
                         "permission to get URL from this server.</h2></body></html>")
        auth = headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return 401, "<html><body><h1>Error: Unauthorized</h1></body></html>"
        try:
            jwt.decode(auth[7:], certs=self.idt_public, audience=fn["serviceConfig"]["uri"],
                       clock_skew_in_seconds=30)
        except Exception:
            return 401, "<html><body><h1>Error: Unauthorized</h1></body></html>"
        return None


def _make_handler(fake: FakeCloudFunctions):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            # without this every keep-alive request waits ~40 ms on Nagle
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args):
            pass

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, code: int, body: bytes, ctype: str = "application/json; charset=UTF-8",
                  headers: dict[str, str] | None = None):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None):
            self._send(code, json.dumps(obj).encode(), headers=headers)

        def _dispatch(self, method: str):
            u = urlsplit(self.path)
            body = self._body()
            try:
                if u.path == "/token" and method == "POST":
                    self._json(*fake.handle_token(body))
                elif u.path.startswith("/upload/") and method == "PUT":
                    self._upload(u.path[len("/upload/"):], body)
                elif u.path.startswith("/run/"):
                    self._run(method, u, body)
                else:
                    query = parse_qs(u.query)
                    code, obj = fake.handle_api(method, u.path, query, self.headers, body)
                    numeric = "enum-encoding=int" in ",".join(query.get("$alt") or [])
                    self._json(code, convert_enums(obj, numeric))
            except ApiError as exc:
                self._json(exc.code, {"error": {"code": exc.code, "message": exc.message,
                                                "status": exc.status}}, headers=exc.headers)

        def _upload(self, obj: str, body: bytes):
            fake.upload_headers.append(dict(self.headers))
            if self.headers.get("Content-Type") != "application/zip":
                # a signed URL is signed for one content type
                self._send(403, b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>"
                                b"SignatureDoesNotMatch</Code></Error>", "application/xml")
                return
            fake.uploads[obj] = body
            self._send(200, b"", "text/plain")

        def _run(self, method: str, u, body: bytes):
            fid, _, rest = u.path[len("/run/"):].partition("/")
            denied = fake.check_invoker(fid, self.headers)
            if denied is not None:
                self._send(denied[0], denied[1].encode(), "text/html; charset=UTF-8")
                return
            hosted = fake.host.lookup(fid)
            if hosted is None:
                self._send(503, b"Service Unavailable", "text/plain")
                return
            fwd = {k: v for k, v in self.headers.items()
                   if k.lower() in ("content-type", "function-execution-id")}
            try:
                r = fake._proxy.request(method, hosted.url + rest, data=body, headers=fwd,
                                        timeout=float(fake.functions[fid]["serviceConfig"]
                                                      .get("timeoutSeconds", 60)))
            except requests.exceptions.Timeout:
                self._send(504, b"upstream request timeout", "text/plain")
                return
            except requests.exceptions.RequestException:
                self._send(503, b"Service Unavailable", "text/plain")
                return
            keep = {k: v for k, v in r.headers.items()
                    if k.lower() in ("x-google-status", "retry-after", "function-execution-id")}
            self._send(r.status_code, r.content, r.headers.get("Content-Type", "text/plain"), keep)

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        def do_PATCH(self):
            self._dispatch("PATCH")

        def do_DELETE(self):
            self._dispatch("DELETE")

    return Handler
