"""The config model of an OpenWhisk cluster (`providers.openwhisk.<name>`),
validated by fedkeeper.config through the provider registry."""
from __future__ import annotations

import re
from typing import ClassVar, Optional
from urllib.parse import urlsplit, urlunsplit

from flcommon.urls import split_userinfo
from pydantic import NonNegativeInt, PositiveInt, SecretStr, field_validator, model_validator

from ...config.clusters import ClusterConfig, Strict
from ...config.values import HostPort, HttpUrl, OpenWhiskName, RegistryPrefix, no_placeholder


class OpenWhiskAuth(Strict):
    ow_auth: Optional[SecretStr] = None
    ow_api_host: Optional[HostPort] = None
    ow_apigw_access_token: Optional[SecretStr] = None

    @field_validator("ow_auth", mode="before")
    @classmethod
    def _uuid_key(cls, v):
        if isinstance(v, str):
            no_placeholder(v)
            user, sep, key = v.strip().partition(":")
            if not sep or not user or not key:
                raise ValueError("the OpenWhisk auth key must be 'uuid:key' "
                                 "(as `wsk property get --auth` prints)")
        return v


class OpenWhiskCluster(ClusterConfig):
    # The original schema writes OpenWhisk timeouts in ms ("300000").
    function_timeout_unit: ClassVar[str] = "ms"
    client_count_key: ClassVar[Optional[str]] = "ow_clients_count"

    base_url: Optional[HttpUrl] = None
    auth: OpenWhiskAuth = OpenWhiskAuth()
    namespace: Optional[OpenWhiskName] = None
    insecure: bool = False  # explicit opt-out of TLS verification
    image_registry: Optional[RegistryPrefix] = None  # prefix of the runtime images (`fedkeeper runtime build --push`)
    # kind: local only: the embedded fabric's invoker capacity (OpenWhisk's
    # userMemory, 2048 MB by default) and prewarmed stem cells per runtime.
    user_memory_mb: Optional[PositiveInt] = None
    stem_cells: Optional[dict[str, NonNegativeInt]] = None

    @model_validator(mode="after")
    def _capacity_local_only(self):
        if self.kind != "local" and (self.user_memory_mb is not None or self.stem_cells is not None):
            raise ValueError("user_memory_mb and stem_cells set the embedded fabric: clusters of kind: local only")
        if self.stem_cells:
            from ...runtimes import runtime_names
            unknown = sorted(set(self.stem_cells) - set(runtime_names()))
            if unknown:
                raise ValueError(f"stem_cells names unknown runtimes {unknown}; known: {runtime_names()}")
        return self

    @model_validator(mode="after")
    def _need_endpoint(self):
        if self.kind == "remote":
            if not (self.base_url or self.auth.ow_api_host):
                raise ValueError("a remote OpenWhisk cluster needs base_url or auth.ow_api_host")
            if self.auth.ow_auth is None and not self._url_userinfo():
                raise ValueError("a remote OpenWhisk cluster needs auth.ow_auth (or ow_auth_file)")
        return self

    def _url_userinfo(self) -> Optional[str]:
        if not self.base_url:
            return None
        u = urlsplit(self.base_url)
        if u.username and u.password:
            return f"{u.username}:{u.password}"
        return None

    def api_host(self) -> str:
        """Scheme://host:port of the controller, from base_url or ow_api_host."""
        if self.base_url:
            u = urlsplit(self.base_url)
            host = u.hostname or ""
            netloc = f"{host}:{u.port}" if u.port else host
            return urlunsplit((u.scheme or "https", netloc, "", "", ""))
        # User info written into ow_api_host is not the host: requests carry
        # auth_pair(), and every message shows this value.
        h = self.auth.ow_api_host or ""
        return split_userinfo(h if "://" in h else f"https://{h}")[0]

    def auth_pair(self) -> tuple[str, str]:
        raw = (self.auth.ow_auth.get_secret_value() if self.auth.ow_auth else None) or self._url_userinfo()
        if not raw:
            raise ValueError("no OpenWhisk auth key")
        user, sep, key = raw.partition(":")
        if not sep or not user or not key:
            raise ValueError("the OpenWhisk auth key must be 'uuid:key' (as `wsk property get --auth` prints)")
        return user, key

    def resolved_namespace(self) -> str:
        if self.namespace:
            return self.namespace
        if self.base_url:
            m = re.search(r"/namespaces/([^/]+)", self.base_url)
            if m:
                return m.group(1)
        return "_"
