"""What the runtime binds to functions: the insights cache always fits in
the memory fl_insights is given; the data URL's credentials go to the
functions that download the data set alone."""
from __future__ import annotations

import json

import pytest

from fedkeeper.config import parse_config
from fedkeeper.runtime import INSIGHTS_WORKING_MB, OPTIONAL_FUNCTIONS, Runtime
from flcommon.data_url import BOUND_KEY


def _runtime(extra: str):
    cfg = parse_config(f"""
providers:
  openwhisk:
    ow: {{kind: local}}
scenarios:
  s:
    mongo_config: {{url: "mongodb://127.0.0.1:1", db: t}}
{extra}
""")
    return Runtime.open(cfg, "s", need_store=False)


@pytest.mark.parametrize("extra, memory_mb, cache_mb", [
    ("", 2048, 512),                                               # defaults
    ("    insights: {cache_mb: 3000}", 3000 + INSIGHTS_WORKING_MB, 3000),  # memory grows with the cache
    ("    insights: {cache_mb: 512}\n    functions: {fl_insights: {openwhisk: {memory: \"1024\"}}}",
     1024, 0),                                                    # set memory wins; cache cut to fit
    ("    insights: {cache_mb: 512}\n    functions: {fl_insights: {openwhisk: {memory: \"1200\"}}}",
     1200, 1200 - INSIGHTS_WORKING_MB),
])
def test_insights_cache_fits_the_function_memory(isolated_dirs, extra, memory_mb, cache_mb):
    spec = _runtime(extra).function_spec("fl_insights", "openwhisk")
    assert spec.memory_mb == memory_mb
    assert float(spec.bound["FK_INSIGHTS_CACHE_MB"]) == cache_mb
    assert float(spec.bound["FK_INSIGHTS_CACHE_MB"]) + INSIGHTS_WORKING_MB <= spec.memory_mb or cache_mb == 0


def test_insights_is_deployed_with_training_but_optional(isolated_dirs):
    rt = _runtime("    clients_info: {total_num_clients: 2, num_clients_per_round: 2, clusters: {ow: 2}}")
    names = [pl.spec.name for pl in rt.training_placements()]
    assert "fl_insights" in names and "fl_insights" in OPTIONAL_FUNCTIONS
    assert not set(OPTIONAL_FUNCTIONS) & {"fl_client", "fl_server_init", "fl_server_aggregator"}


def test_data_url_credentials_are_bound_to_the_data_loaders_only(isolated_dirs):
    """The data URL's user info goes to fl_server_init and fl_model_validate
    (which download the data set) as bound configuration; the session spec keeps the URL without
    it; a URL without user info binds nothing."""
    training = "    clients_info: {total_num_clients: 2, num_clients_per_round: 2, clusters: {ow: 2}}\n"
    url = "https://al%40ice:t0k%2Fen@Data.example.org:8443/d.npz?v=1"
    rt = _runtime(training + f"    training_test_data: {{dataset: npz, path: '{url}'}}")
    bound = {fn: rt.function_spec(fn, "openwhisk").bound for fn in ("fl_server_init", "fl_server_aggregator",
                                                                      "fl_client", "fl_insights", "fl_model_validate")}
    assert json.loads(bound["fl_server_init"][BOUND_KEY]) == {"https://data.example.org:8443": "al%40ice:t0k%2Fen"}
    assert [fn for fn, b in bound.items() if BOUND_KEY in b] == ["fl_server_init", "fl_model_validate"]
    assert rt.scenario.training_test_data.stored()["path"] == "https://Data.example.org:8443/d.npz?v=1"
    plain = _runtime(training + "    training_test_data: {dataset: npz, path: 'https://data.example.org/d.npz'}")
    assert BOUND_KEY not in plain.function_spec("fl_server_init", "openwhisk").bound
    assert plain.scenario.training_test_data.stored()["path"] == "https://data.example.org/d.npz"
