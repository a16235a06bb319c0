"""A Cloud Functions function's bound configuration (token secret, store URL,
client secret...) as Secret Manager secrets, through the official client.

Put in the function's plain environment variables, those values would be
part of its configuration, readable by anyone who may view the function or
its Cloud Run service (roles/viewer). Instead each bound value is a secret
of its own, `fedkeeper-<region>-<function id>-<KEY>` (secrets belong to the
project, functions to a region: two clusters of one project each keep their
own), and the function's `secret_environment_variables` name it at a pinned
version: the service reads the value when an instance starts, and the
function's configuration holds only the secret's name. A value that is empty
(a store URL not known when `check` deploys its probe) is no secret, and
Secret Manager holds no empty payload: it stays a plain variable.

A value is written as a new version only when it differs from the latest
one, so an unchanged deploy leaves the versions, and so the function,
unchanged; a changed value is a new version, a changed pin, an update, and
the version it replaced is destroyed once the function runs on the new one.
Removing the function deletes its secrets (found by their labels).

The deploying service account needs roles/secretmanager.admin on the project
(create, write, read, list and delete secrets), and the function's runtime
service account roles/secretmanager.secretAccessor on these secrets
(docs/deploy-cloud-functions.md).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Mapping

from google.api_core import exceptions as gexc

from .errors import map_api_error

RPC_TIMEOUT_S = 60.0
#: labels naming the function (label_value of its name) and region a secret belongs to
FUNCTION_LABEL = "fedkeeper_function"
REGION_LABEL = "fedkeeper_region"


def secret_id(region: str, fid: str, key: str) -> str:
    """The secret holding bound value `key` of function id `fid` in
    `region`: letters, digits, '-' and '_', as Secret Manager ids allow."""
    return f"fedkeeper-{region}-{fid}-{key}"


class BoundSecrets:
    """The secrets of one project's functions in one region, through a
    client made on first use by `make_client` (the official
    SecretManagerServiceClient)."""

    def __init__(self, project: str, region: str, make_client: Callable[[], Any]):
        self.project = project
        self.region = region
        self._make_client = make_client
        self._client = None
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _name(self, sid: str) -> str:
        return f"projects/{self.project}/secrets/{sid}"

    def pin(self, fid: str, label: str, bound: Mapping[str, str]) -> tuple[list[Any], list[str]]:
        """(SecretEnvVar messages for every non-empty bound value of function
        `fid`, each pinned to the version that holds the value, written now
        if the latest version holds another; the names of the versions the
        new ones replace, for `destroy` once the function uses the new)."""
        from google.cloud import functions_v2
        pins, replaced = [], []
        for key, value in sorted(bound.items()):
            if value == "":
                continue
            sid = secret_id(self.region, fid, key)
            version, old = self._version_holding(sid, label, value.encode())
            pins.append(functions_v2.SecretEnvVar(key=key, project_id=self.project, secret=sid, version=version))
            replaced += [old] if old else []
        return pins, replaced

    def _version_holding(self, sid: str, label: str, data: bytes) -> tuple[str, str | None]:
        """(the number of a version holding `data`, the name of the latest
        version it replaces, if any)."""
        client, name = self.client(), self._name(sid)
        replaced = None
        try:
            latest = client.access_secret_version(request={"name": f"{name}/versions/latest"},
                                                  timeout=RPC_TIMEOUT_S)
            if latest.payload.data == data:
                return latest.name.rsplit("/", 1)[-1], None
            replaced = latest.name
        except gexc.NotFound:   # no such secret yet, or no version of it
            self._create(sid, label)
        except (gexc.FailedPrecondition, gexc.BadRequest):
            # its latest version was disabled or destroyed (FAILED_PRECONDITION,
            # which the REST transport raises as the HTTP 400 it comes in): write anew
            pass
        except Exception as exc:
            raise map_api_error(exc, f"read secret {sid}") from None
        try:
            added = client.add_secret_version(request={"parent": name, "payload": {"data": data}},
                                              timeout=RPC_TIMEOUT_S)
        except Exception as exc:
            raise map_api_error(exc, f"write secret {sid}") from None
        return added.name.rsplit("/", 1)[-1], replaced

    def _create(self, sid: str, label: str) -> None:
        try:
            self.client().create_secret(
                request={"parent": f"projects/{self.project}", "secret_id": sid,
                         "secret": {"replication": {"automatic": {}},
                                    "labels": {FUNCTION_LABEL: label, REGION_LABEL: self.region}}},
                timeout=RPC_TIMEOUT_S)
        except gexc.AlreadyExists:   # it exists, without a version yet
            pass
        except Exception as exc:
            raise map_api_error(exc, f"create secret {sid}") from None

    def destroy(self, versions: list[str]) -> None:
        """Destroy versions no function pins any more (the values they held
        stay readable, and billed, while they are enabled). Best effort: a
        version left is a cost, not a fault of the deploy that made it."""
        for name in versions:
            try:
                self.client().destroy_secret_version(request={"name": name}, timeout=RPC_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - see above
                pass

    def remove(self, label: str) -> int:
        """Delete the secrets of the function labelled `label` in this
        region; how many."""
        client = self.client()
        flt = f"labels.{FUNCTION_LABEL}={label} AND labels.{REGION_LABEL}={self.region}"
        try:
            found = [s.name for s in client.list_secrets(
                request={"parent": f"projects/{self.project}", "filter": flt}, timeout=RPC_TIMEOUT_S)]
        except Exception as exc:
            raise map_api_error(exc, "list secrets") from None
        for name in found:
            try:
                client.delete_secret(request={"name": name}, timeout=RPC_TIMEOUT_S)
            except gexc.NotFound:
                pass
            except Exception as exc:
                raise map_api_error(exc, f"delete secret {name.rsplit('/', 1)[-1]}") from None
        return len(found)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.transport.close()
            except Exception:  # closing must never mask the keeper's own error
                pass
