"""What every cluster shares (kind, invocation, faults, Prometheus, host
configurations, pricing) and `Providers`, which validates each
`providers.<section>.<cluster>` with the cluster model of the provider package
the registry names for that section. Nothing here knows a platform."""
from __future__ import annotations

import re
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Fault injection on local clusters: the local platforms' one fault model validates it.
from ..local.fault_config import FaultConfig
from .errors import closest, one_of
from .values import Currency, HttpUrl, Port, host_port, positive_count


class _Keys(BaseModel):
    """Refuses a key that looks like a misspelt known key, naming the key it
    probably meant; Strict refuses every other unknown key too."""

    # How alike an unknown key must be to a known one to be taken for its
    # typo; Open blocks legitimately hold other keys, so they ask for more.
    _typo_cutoff: ClassVar[float] = 0.6

    @model_validator(mode="before")
    @classmethod
    def _misspelt_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        for key in data:
            if key not in known:
                hint = closest(str(key), known, cls._typo_cutoff)
                if hint:
                    raise ValueError(f"{key}: unknown key; did you mean {hint}?")
        return data


class Strict(_Keys):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class Open(_Keys):
    """Keeps keys it does not know (the original schema has free-form blocks),
    except those that look like a misspelt known key."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)
    _typo_cutoff: ClassVar[float] = 0.8


class PrometheusConfig(Open):
    host: str = ""
    port_openwhisk_metrics: Optional[Port] = None
    port_node_metrics: Optional[Port] = None
    url: Optional[HttpUrl] = None  # full URL of a Prometheus server, overrides host/port

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return host_port(v) if v else v


_RAM_RE = re.compile(r"\s*[0-9]+(\.[0-9]+)?\s*([kmgtp]i?b?)?\s*", re.I)


class HostConfigurations(Open):
    num_hosts: Optional[int] = Field(None, gt=0)
    each_host_cores: Optional[Union[int, str]] = None
    each_host_ram: Optional[str] = None
    gpu_enabled: bool = False
    cuda_cores: Optional[Union[int, str]] = None
    platform: Optional[str] = None
    host_names: Optional[Union[str, list[str]]] = None
    concurrency: Optional[int] = Field(None, gt=0)

    @field_validator("each_host_cores", "cuda_cores")
    @classmethod
    def _cores(cls, v):
        # The original sample leaves unknown counts as "".
        positive_count(v)
        return v

    @field_validator("each_host_ram")
    @classmethod
    def _ram(cls, v):
        if v and not _RAM_RE.fullmatch(v):
            raise ValueError(f"expected a memory size such as 128gb or 512Mi, got {v!r}")
        return v


class PricingConfig(Strict):
    """Prices used to estimate cost; unset keys keep the platform's defaults
    (README, "Cost")."""

    per_gb_second: Optional[float] = Field(None, ge=0)
    per_ghz_second: Optional[float] = Field(None, ge=0)
    per_million_invocations: Optional[float] = Field(None, ge=0)
    billing_increment_ms: Optional[int] = Field(None, ge=1)
    currency: Currency = "USD"


class ClusterConfig(Strict):
    """The keys every cluster has. A platform's model (in its provider
    package) adds its own and may narrow `kind` or `invocation`."""

    # functions.<fn>.<section>.timeout written as a bare number is in this unit.
    function_timeout_unit: ClassVar[str] = "s"
    # The original clients_info key that counts this platform's clients.
    client_count_key: ClassVar[Optional[str]] = None
    # The most memory and time any function may have on the platform (None:
    # each cluster's own limits decide; the provider checks them at deploy).
    function_memory_mb_max: ClassVar[Optional[int]] = None
    function_timeout_s_max: ClassVar[Optional[float]] = None

    kind: Literal["remote", "local"] = "remote"
    invocation: Literal["direct", "via_invoker"] = "direct"
    faults: Optional[FaultConfig] = None
    prometheus_config: Optional[PrometheusConfig] = None
    configurations: Optional[HostConfigurations] = None
    kubeconfig: Optional[str] = None
    context: Optional[str] = None
    pricing: Optional[PricingConfig] = None  # overrides the platform's default prices

    @model_validator(mode="after")
    def _faults_local_only(self):
        if self.faults is not None and self.kind != "local":
            raise ValueError("faults can only be injected on clusters of kind: local")
        return self


def provider_sections() -> tuple[str, ...]:
    from ..providers import cluster_sections
    return cluster_sections()


def cluster_model(section: str) -> type[ClusterConfig]:
    """The cluster model of a provider section; ValueError (with a hint) for
    a section no provider has."""
    from ..providers import cluster_model_class
    sections = provider_sections()
    if section not in sections:
        raise ValueError(one_of(section, sections, "provider section"))
    return cluster_model_class(section)


class Providers(BaseModel):
    """providers.<section>.<cluster>, each section's clusters validated by the
    model its provider package defines. Every section is present (empty when
    the config has none of its clusters), so `providers.<section>` always works."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any) -> Any:
        if data is None:
            data = {}
        if isinstance(data, Providers):
            return data
        if not isinstance(data, dict):
            raise ValueError("expected a mapping of provider sections")
        out: dict[str, Any] = {s: {} for s in provider_sections()}
        for section, clusters in data.items():
            model = cluster_model(section)
            if clusters is None:
                clusters = {}
            if not isinstance(clusters, dict):
                raise ValueError(f"providers.{section} must map cluster names to their settings")
            out[section] = {str(name): c if isinstance(c, model) else model.model_validate(c or {})
                            for name, c in clusters.items()}
        return out

    def sections(self) -> dict[str, dict[str, ClusterConfig]]:
        return dict(self.__pydantic_extra__ or {})

    def clusters(self) -> dict[str, tuple[str, Any]]:
        """cluster name -> (provider section, cluster config), in registry order."""
        out: dict[str, tuple[str, Any]] = {}
        for section, clusters in self.sections().items():
            for name, c in clusters.items():
                out[name] = (section, c)
        return out
