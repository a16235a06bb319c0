"""Knative Serving: functions as Knative Services through the kubernetes client."""
from .manifests import service_name
from .provider import KnativeProvider, knative_status_hook

__all__ = ["KnativeProvider", "knative_status_hook", "service_name"]
