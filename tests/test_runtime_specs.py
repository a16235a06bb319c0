"""What the runtime binds to functions: the insights cache always fits in
the memory fl_insights is given."""
from __future__ import annotations

import pytest

from fedkeeper.config import parse_config
from fedkeeper.runtime import INSIGHTS_WORKING_MB, OPTIONAL_FUNCTIONS, Runtime


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
