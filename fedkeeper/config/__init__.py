"""YAML -> typed, validated configuration.

Accepts the original FedKeeper `config-sample.yaml` schema (providers.openwhisk,
providers.google, scenarios.<name> with server_config, clients_info,
data_sampling, mongo_config, training_test_data, model_params, functions) and
adds what it lacked as explicit keys with documented defaults (the `training`
block of a scenario, `kind: local` clusters, fault injection).

Each `providers.<section>.<cluster>` is validated by the cluster model of the
provider package the registry (fedkeeper.providers) names for that section;
nothing here names a platform. Strategy defaults come from flcommon.strategies.

Secrets come from `${ENV_VAR}` interpolation or from `<key>_file` siblings and
are held as `SecretStr`, so printing a config never shows them.

Every error names the file, the line and the key path.

    clusters.py    what every cluster shares; Providers (registry-driven)
    scenario.py    the scenario blocks of the original schema
    training.py    model params, strategy, retries, round mode, insights
    model.py       Config; secrets and redaction
    loading.py     YAML, ${ENV}, <key>_file, units, validation
    references.py  checks across sections
    render.py      `config show`, which reads back to the same values
"""
from __future__ import annotations

from typing import Any

from .clusters import (ClusterConfig, FaultConfig, HostConfigurations, PricingConfig, PrometheusConfig,
                       Providers, cluster_model, provider_sections)
from .errors import ConfigError
from .loading import error_reason, load_config, parse_config
from .model import SECRET_KEYS, Config, redact
from .references import check_references
from .render import render_config, to_yaml_dict
from .scenario import (ClientsInfo, DataSampling, FunctionConfig, MongoConfig, Scenario, ServerConfig,
                       TrainingTestData, client_placement)
from .training import (STRATEGIES, InsightsConfig, ModelParams, RetryConfig, StrategyConfig,
                       TrainingConfig)
from .units import format_duration_s, format_memory_mb, parse_duration_s, parse_memory_mb

__all__ = ["SECRET_KEYS", "STRATEGIES", "ClientsInfo", "ClusterConfig", "Config", "ConfigError",
           "DataSampling", "FaultConfig", "FunctionConfig", "HostConfigurations", "InsightsConfig",
           "ModelParams", "MongoConfig", "PricingConfig", "PrometheusConfig", "Providers", "RetryConfig",
           "Scenario", "ServerConfig", "StrategyConfig", "TrainingConfig", "TrainingTestData",
           "check_references", "client_placement", "error_reason", "cluster_model", "format_duration_s",
           "format_memory_mb", "load_config", "parse_config", "parse_duration_s", "parse_memory_mb",
           "provider_sections", "redact", "render_config", "to_yaml_dict"]


def __getattr__(name: str) -> Any:
    """A platform's cluster model by its class name (`OpenWhiskCluster`, ...),
    found through the registry so this package names no platform; imported
    only when asked for."""
    for section in provider_sections():
        model = cluster_model(section)
        if model.__name__ == name:
            return model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
