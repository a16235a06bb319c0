"""The configuration files of the end-to-end sessions, written from one base
(the config shape users write: providers, then one federated_learning
scenario), so that a test states only what its session changes."""
from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import yaml

#: the function limits most end-to-end sessions run with
FUNCTIONS: dict[str, Any] = {
    "fl_client": {"openwhisk": {"timeout": "60000", "memory": "1024"},
                  "google": {"timeout": "60s", "memory": "1024MB"}},
    "fl_server_init": {"openwhisk": {"timeout": "120000"}},
    "fl_server_aggregator": {"openwhisk": {"timeout": "120000"}},
}
MODEL_PARAMS: dict[str, Any] = {"lr": "1e-2", "optim": "adam", "local_epochs": "1"}
LOCAL = {"kind": "local"}


class _PlainDumper(yaml.SafeDumper):
    """Writes a mapping shared by two clusters out twice, as a user would,
    not as an anchor and an alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def fragment(text: str) -> dict[str, Any]:
    """A YAML mapping written inline by a test ("" is an empty one)."""
    doc = yaml.safe_load(textwrap.dedent(text)) if text.strip() else {}
    assert isinstance(doc, dict), f"not a YAML mapping: {text!r}"
    return doc


def write_session_config(path: Path, *, name: str, mongo: dict[str, Any], clients_info: dict[str, Any],
                         training: dict[str, Any], openwhisk: dict[str, Any] | None = None,
                         google: dict[str, Any] | None = None, server: str = "local_ow",
                         functions: dict[str, Any] | None = None, model_params: dict[str, Any] | None = None,
                         scenario: dict[str, Any] | None = None) -> Path:
    """`openwhisk`/`google`: cluster name -> cluster (default: one local
    OpenWhisk cluster, `local_ow`, and no Cloud Functions); `scenario`:
    further top-level keys of the scenario (a user module, ...)."""
    providers: dict[str, Any] = {"openwhisk": openwhisk or {"local_ow": dict(LOCAL)}}
    if google:
        providers["google"] = google
    doc = {
        "name": name,
        "providers": providers,
        "scenarios": {"federated_learning": {
            "server_config": {"server_cluster_name": server},
            "clients_info": clients_info,
            "data_sampling": {"model": "small", "batch_size": 16},
            "mongo_config": mongo,
            "model_params": model_params if model_params is not None else dict(MODEL_PARAMS),
            **(scenario or {}),
            "training": training,
            "functions": functions if functions is not None else copy.deepcopy(FUNCTIONS),
        }},
    }
    path.write_text(yaml.dump(doc, Dumper=_PlainDumper, sort_keys=False))
    return path


def write_user_module_config(folder: Path, user_module: str | None, clients: int = 4) -> Path:
    """cfg.yaml in `folder`: one local OpenWhisk cluster, and a
    federated_learning scenario training `user_module` (its YAML value: a
    path, or a mapping with the path and parameters; None: the built-in
    model) over `clients` clients, for the commands and checks that read a
    user module (config validate, deploy --dry-run, the functions' zips)."""
    p = folder / "cfg.yaml"
    key = f"user_module: {user_module}" if user_module is not None else ""
    p.write_text(textwrap.dedent(f"""\
        providers:
          openwhisk:
            local_ow: {{kind: local}}
        scenarios:
          federated_learning:
            {key}
            clients_info: {{total_num_clients: {clients}, num_clients_per_round: {clients},
                           ow_clients_count: {clients}}}
        """))
    return p
