"""Service-account credentials for both planes of Cloud Functions.

Control plane: the official client signs its own JWTs from the service
account key (self-signed JWT access), no token endpoint involved.

Data plane: a function that requires authentication wants an OpenID Connect
ID token whose audience is the function URL. google-auth obtains one by
exchanging a signed assertion at the account's token_uri. One credentials
object per audience is cached and refreshed only when it is about to expire,
so invocations never fetch a token each.
"""
from __future__ import annotations

import threading
from typing import Any, Mapping

import google.auth.transport.requests as gtr
import requests
from google.auth import exceptions as auth_exc
from google.oauth2 import service_account

from ..base import ErrorClass, ProviderError

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def control_plane_credentials(info: Mapping[str, Any]) -> service_account.Credentials:
    try:
        return service_account.Credentials.from_service_account_info(
            dict(info), scopes=[CLOUD_PLATFORM_SCOPE])
    except (ValueError, KeyError) as exc:
        # The message names the missing field, never a key value.
        raise ProviderError(ErrorClass.AUTH, f"the service-account JSON is not usable: {exc}") from None


class IdTokenCache:
    """Authorization headers with a cached ID token per audience."""

    def __init__(self, info: Mapping[str, Any]):
        self._info = dict(info)
        self._creds: dict[str, service_account.IDTokenCredentials] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._request = gtr.Request(session=self._session)

    def _for(self, audience: str) -> tuple[service_account.IDTokenCredentials, threading.Lock]:
        with self._lock:
            creds = self._creds.get(audience)
            if creds is None:
                try:
                    creds = service_account.IDTokenCredentials.from_service_account_info(
                        self._info, target_audience=audience)
                except (ValueError, KeyError) as exc:
                    raise ProviderError(ErrorClass.AUTH,
                                        f"the service-account JSON is not usable: {exc}") from None
                self._creds[audience] = creds
                self._locks[audience] = threading.Lock()
            return creds, self._locks[audience]

    def token(self, audience: str) -> str:
        creds, lock = self._for(audience)
        if creds.valid:
            return creds.token
        # One refresh per audience at a time; the others wait and reuse it.
        with lock:
            if not creds.valid:
                try:
                    creds.refresh(self._request)
                except auth_exc.RefreshError as exc:
                    if getattr(exc, "retryable", False):   # the endpoint's 5xx or 429: an outage
                        raise ProviderError(ErrorClass.UNREACHABLE,
                                            f"token endpoint unavailable: {exc}") from None
                    raise ProviderError(ErrorClass.AUTH, f"ID token refused: {exc}") from None
                except auth_exc.TransportError as exc:
                    raise ProviderError(ErrorClass.UNREACHABLE,
                                        f"token endpoint unreachable: {exc}") from None
            return creds.token

    def headers(self, url: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(audience_for(url))}"}

    def close(self) -> None:
        self._session.close()


def audience_for(url: str) -> str:
    """The function URL itself is the audience the service expects; query
    strings are not part of it."""
    return url.split("?", 1)[0].rstrip("/")
