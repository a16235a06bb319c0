"""Kubernetes access through the official client: an authenticated
`ApiClient` from a cluster's config section, and API failures as classified
ProviderErrors. Used by the Knative provider and by introspection.

Connection settings are read from the cluster's config section:
  api_server   plain base URL, no credentials (`kubectl proxy`, tests)
  in_cluster   the pod's service account (the keeper runs in the cluster)
  kubeconfig   a kubeconfig file (default: $KUBECONFIG or ~/.kube/config)
  context      a context in that file (default: its current context)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..base import ErrorClass, ProviderError

#: (connect, read) seconds for every control-plane call: a dead API server
#: must fail in seconds, not in the client's default of "forever"
REQUEST_TIMEOUT = (5.0, 30.0)


# ------------------------------------------------------------------ client

def api_client(cluster: Any):
    """An authenticated `kubernetes.client.ApiClient` for a cluster section.

    Raises ProviderError(AUTH) when no usable credentials are found, so
    that the CLI can print one line instead of a traceback.
    """
    from kubernetes import client, config as kconfig

    conf = client.Configuration()
    api_server = getattr(cluster, "api_server", None)
    try:
        if api_server:
            conf.host = str(api_server).rstrip("/")
        elif getattr(cluster, "in_cluster", False):
            kconfig.load_incluster_config(client_configuration=conf)
        else:
            path = getattr(cluster, "kubeconfig", None)
            kconfig.load_kube_config(
                config_file=str(Path(path).expanduser()) if path else None,
                context=getattr(cluster, "context", None) or None,
                client_configuration=conf, persist_config=False)
    except (kconfig.ConfigException, OSError, TypeError, ValueError) as exc:
        # the message names the file/context, never a token
        raise ProviderError(ErrorClass.AUTH, f"cannot load Kubernetes credentials: {exc}") from None
    # one retry on connection errors only; the callers bound everything else
    conf.retries = 1
    return client.ApiClient(conf)


def api_message(exc: Exception) -> str:
    """The API server's own message from an ApiException body (a Status)."""
    body = getattr(exc, "body", None)
    if body:
        try:
            status = json.loads(body)
            if isinstance(status, dict) and status.get("message"):
                return str(status["message"])[:400]
        except (ValueError, TypeError):
            pass
    return str(getattr(exc, "reason", None) or exc)[:400]


def map_api_error(exc: BaseException, what: str) -> ProviderError:
    """A Kubernetes control-plane failure as a classified ProviderError."""
    if isinstance(exc, ProviderError):
        return exc
    from kubernetes.client.exceptions import ApiException
    import urllib3.exceptions as u3

    if isinstance(exc, ApiException):
        status = exc.status or 0
        msg = f"{what}: HTTP {status}: {api_message(exc)}"
        if status in (401, 403):
            return ProviderError(ErrorClass.AUTH, msg, status=status)
        if status == 404:
            return ProviderError(ErrorClass.FUNCTION_MISSING, msg, status=status)
        if status == 413:
            return ProviderError(ErrorClass.PAYLOAD_TOO_LARGE, msg, status=status)
        if status == 429:
            from ..http_answers import retry_after_seconds
            headers = exc.headers or {}
            return ProviderError(ErrorClass.THROTTLED, msg, status=status,
                                 retry_after=retry_after_seconds(headers.get("Retry-After")))
        if status == 504:
            return ProviderError(ErrorClass.TIMEOUT, msg, status=status)
        if status == 0:
            return ProviderError(ErrorClass.UNREACHABLE, msg)
        return ProviderError(ErrorClass.PLATFORM_ERROR, msg, status=status)
    if isinstance(exc, (u3.ReadTimeoutError, TimeoutError)):
        return ProviderError(ErrorClass.TIMEOUT, f"{what}: the API server did not answer in time")
    if isinstance(exc, (u3.MaxRetryError, u3.NewConnectionError, u3.ProtocolError,
                        ConnectionError, u3.SSLError)):
        reason = getattr(exc, "reason", None) or exc
        return ProviderError(ErrorClass.UNREACHABLE, f"{what}: API server unreachable: {reason}")
    return ProviderError(ErrorClass.PLATFORM_ERROR, f"{what}: {type(exc).__name__}: {exc}")


