"""Provider registry: the one place that maps a cluster's config section and
kind onto the class that drives it. The keeper asks `make_provider` and
never looks at platform names itself."""
from __future__ import annotations

import importlib
from typing import Any

from .base import (Artifact, DeployResult, ErrorClass, FunctionSpec, Invocation, Outcome, Prices,
                   Provider, ProviderContext, ProviderError)

__all__ = ["Artifact", "DeployResult", "ErrorClass", "FunctionSpec", "Invocation", "Outcome", "Prices",
           "Provider", "ProviderContext", "ProviderError", "image_variant", "image_variant_names",
           "make_provider", "platform_prices", "provider_class"]

# (config section, cluster kind) -> "module:Class", imported on first use so
# that a run without Google clusters never imports the Google client.
_REGISTRY: dict[tuple[str, str], str] = {
    ("openwhisk", "remote"): "fedkeeper.providers.openwhisk:OpenWhiskProvider",
    ("openwhisk", "local"): "fedkeeper.local.openwhisk:LocalOpenWhiskProvider",
    ("google", "remote"): "fedkeeper.providers.gcf:CloudFunctionsProvider",
    ("google", "local"): "fedkeeper.local.cloud_functions:LocalCloudFunctionsProvider",
    ("knative", "remote"): "fedkeeper.providers.knative:KnativeProvider",
}

# config section -> "module:Class" of the cluster model that validates
# `providers.<section>.<cluster>` (fedkeeper.config asks, lazily, like above).
_CLUSTER_MODELS: dict[str, str] = {
    "openwhisk": "fedkeeper.providers.openwhisk.cluster:OpenWhiskCluster",
    "google": "fedkeeper.providers.gcf.cluster:GoogleCluster",
    "knative": "fedkeeper.providers.knative.cluster:KnativeCluster",
}


def cluster_sections() -> tuple[str, ...]:
    """The config sections under `providers:`, in the order clusters are listed."""
    return tuple(_CLUSTER_MODELS)


def _resolve(target: str) -> Any:
    """The attribute a registry entry ("module:attribute") names, imported now."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def cluster_model_class(section: str) -> type:
    return _resolve(_CLUSTER_MODELS[section])


# image variant name -> "module:attribute" of the provider package's runtime
# image variant (fedkeeper.runtimes.images asks, lazily, like above).
_IMAGE_VARIANTS: dict[str, str] = {
    "openwhisk": "fedkeeper.providers.openwhisk.image_variant:IMAGE_VARIANT",
    "knative": "fedkeeper.providers.knative.image_variant:IMAGE_VARIANT",
}


def image_variant_names() -> tuple[str, ...]:
    """The runtime image variants, in the order they are listed and built."""
    return tuple(_IMAGE_VARIANTS)


def image_variant(name: str) -> Any:
    """The `ImageVariant` a provider package defines; KeyError if none is named `name`."""
    return _resolve(_IMAGE_VARIANTS[name])


def provider_class(section: str, kind: str) -> type[Provider]:
    try:
        target = _REGISTRY[(section, kind)]
    except KeyError:
        raise ProviderError(ErrorClass.PLATFORM_ERROR,
                            f"no provider for {section} clusters of kind {kind!r}") from None
    try:
        return _resolve(target)
    except (ImportError, AttributeError) as exc:
        raise ProviderError(ErrorClass.PLATFORM_ERROR,
                            f"the {section}/{kind} provider is not available: {exc}") from None


def make_provider(cluster_name: str, section: str, cluster: Any, ctx: ProviderContext) -> Provider:
    return provider_class(section, getattr(cluster, "kind", "remote"))(cluster_name, cluster, ctx)


# Platform name (`Provider.platform`, recorded on every attempt) -> the
# config section whose remote provider class holds that platform's prices.
_PLATFORM_SECTIONS: dict[str, str] = {"openwhisk": "openwhisk", "gcf": "google", "knative": "knative"}


def platform_prices(platform: str) -> Prices:
    """Default prices of a platform, by the name attempts record; a platform
    this registry does not know (or cannot import) costs nothing."""
    section = _PLATFORM_SECTIONS.get(platform)
    if section is None:
        return Provider.default_prices
    try:
        return provider_class(section, "remote").default_prices
    except ProviderError:
        return Provider.default_prices
