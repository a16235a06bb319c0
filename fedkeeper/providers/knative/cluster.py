"""The config model of a Knative cluster (`providers.knative.<name>`),
validated by fedkeeper.config through the provider registry."""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field

from ...config.clusters import ClusterConfig
from ...config.values import DnsLabel, HostPort, HttpUrl, ImageRef, RegistryPrefix


class KnativeCluster(ClusterConfig):
    """A Kubernetes cluster with Knative Serving (see docs/knative.md).

    Credentials: kubeconfig + context (default: $KUBECONFIG or
    ~/.kube/config and its current context), or in_cluster, or api_server
    (a plain URL such as `kubectl proxy`'s, no credentials)."""

    # Always a Kubernetes cluster: introspection applies without kubeconfig set.
    on_kubernetes: ClassVar[bool] = True

    kind: Literal["remote"] = "remote"     # no local Knative: the emulator is a remote API
    namespace: DnsLabel = "default"
    image: Optional[ImageRef] = None        # one image for every function instead of its runtime's
    image_registry: Optional[RegistryPrefix] = None  # prefix of the runtime images (`fedkeeper runtime build --push`)
    api_server: Optional[HttpUrl] = None   # e.g. http://127.0.0.1:8001 from `kubectl proxy`
    in_cluster: bool = False           # use the pod's service account
    ready_timeout_s: float = Field(300.0, gt=0)  # bounded wait for Ready after a deploy
    ingress: Optional[HostPort] = None      # gateway address when service host names do not resolve
