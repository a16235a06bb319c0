"""Kubernetes, for the platforms that run on it (Knative; OpenWhisk
deployed on Kubernetes): client and error mapping (`client`), what a
cluster offers (`introspection`), and writing those figures into a config
(`config_edit`)."""
from .client import REQUEST_TIMEOUT, api_client, api_message, map_api_error
from .config_edit import ConfigEditError, edit_configurations, write_configurations
from .introspection import (CONFIG_KEYS, cluster_info, compare_configurations, format_info, format_ram,
                            kube_clusters, node_summary, parse_quantity, parse_ram)

__all__ = ["CONFIG_KEYS", "ConfigEditError", "REQUEST_TIMEOUT", "api_client", "api_message", "cluster_info",
           "compare_configurations", "edit_configurations", "format_info", "format_ram", "kube_clusters",
           "map_api_error", "node_summary", "parse_quantity", "parse_ram", "write_configurations"]
