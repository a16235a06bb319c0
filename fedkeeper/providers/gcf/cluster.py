"""The config model of a Google Cloud Functions cluster
(`providers.google.<name>`), validated by fedkeeper.config through the
provider registry."""
from __future__ import annotations

import re
from typing import Any, ClassVar, Optional

from pydantic import SecretStr, field_validator, model_validator

from ...config.clusters import ClusterConfig
from ...config.values import HostPort, HttpUrl

_BASE_URL_RE = re.compile(r"https?://([a-z]+-[a-z]+[0-9]+)-([a-z0-9-]+)\.cloudfunctions\.net")


class GoogleCluster(ClusterConfig):
    client_count_key: ClassVar[Optional[str]] = "gcf_clients_count"
    # Cloud Functions (2nd gen) limits for any function: 32 GiB, 60 minutes (HTTP).
    function_memory_mb_max: ClassVar[Optional[int]] = 32768
    function_timeout_s_max: ClassVar[Optional[float]] = 3600.0

    base_url: Optional[HttpUrl] = None
    auth: Optional[dict[str, Any]] = None  # service-account JSON, inline
    project: Optional[str] = None
    region: Optional[str] = None
    api_endpoint: Optional[HostPort] = None  # control-plane override (tests, private endpoints)
    secret_manager_endpoint: Optional[HostPort] = None  # the same for Secret Manager (bound configuration)

    @field_validator("project")
    @classmethod
    def _project(cls, v):
        if v is not None and not re.fullmatch(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", v):
            raise ValueError(f"{v!r} is not a Google Cloud project id (6 to 30 lower-case letters, "
                             "digits and '-', starting with a letter)")
        return v

    @field_validator("region")
    @classmethod
    def _region(cls, v):
        if v is not None and not re.fullmatch(r"[a-z]+-[a-z]+[0-9]+", v):
            raise ValueError(f"{v!r} is not a Google Cloud region such as us-central1")
        return v

    @field_validator("auth")
    @classmethod
    def _service_account(cls, v):
        if v and v.get("type") not in (None, "service_account"):
            raise ValueError(f"auth is a {v.get('type')!r} credential; expected a service-account key "
                             "(type: service_account)")
        return v

    @model_validator(mode="after")
    def _derive(self):
        m = _BASE_URL_RE.match(self.base_url or "")
        if m:
            self.region = self.region or m.group(1)
            self.project = self.project or m.group(2)
        self.region = self.region or "us-central1"
        return self

    def service_account_info(self) -> dict[str, Any]:
        info = {}
        for k, v in (self.auth or {}).items():
            info[k] = v.get_secret_value() if isinstance(v, SecretStr) else v
        return info
