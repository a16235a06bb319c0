"""Cost estimates from attempt documents in a real store: billing increments,
memory fallbacks, per-round and per-cluster sums, and cluster overrides of
the platforms' default prices. Expected figures are worked out by hand from
the price sheets quoted in docs/cost.md."""
from __future__ import annotations

import json
import math
import textwrap

import pytest
from bson import ObjectId
from click.testing import CliRunner

from fedkeeper.cli import main as cli
from fedkeeper.config import parse_config
from fedkeeper.cost import Charge, PriceBook, attempt_charge, attempts_cost, billed_ms, session_cost
from fedkeeper.providers import platform_prices

SESSION = "cost-1"


def config_text(mongo_url: str, db: str, kn_pricing: str) -> str:
    return textwrap.dedent(f"""\
        name: costtest
        providers:
          openwhisk:
            ow: {{kind: local}}
          google:
            gc: {{kind: local}}
          knative:
            kn:
              pricing: {kn_pricing}
        scenarios:
          federated_learning:
            clients_info: {{total_num_clients: 3, num_clients_per_round: 3, clusters: {{ow: 1, gc: 1, kn: 1}}}}
            mongo_config: {{url: "{mongo_url}", db: {db}}}
            functions:
              fl_client:
                openwhisk: {{memory: "512"}}
        """)


KN_OVERRIDE = "{per_gb_second: 0.00001, per_million_invocations: 2.0, billing_increment_ms: 1}"


def attempt(rnd: int, client: str, cluster: str, platform: str, *, duration_ms=None, memory_mb=None,
            platform_id="act", state="succeeded", function="fl_client", attempt_no=1) -> dict:
    doc = {"_id": ObjectId(), "session": SESSION, "round": rnd, "client": client, "attempt": attempt_no,
           "cluster": cluster, "platform": platform, "function": function, "state": state,
           "platform_id": platform_id, "duration_ms": duration_ms}
    if memory_mb is not None:
        doc["memory_mb"] = memory_mb
    return doc


@pytest.fixture
def priced_session(store):
    store.create_session({"_id": SESSION, "name": "costtest", "scenario": "federated_learning"})
    store.insert_attempts([
        # OpenWhisk (IBM Cloud Functions prices: $0.000017/GB-s, 100 ms steps)
        attempt(0, "client_0", "ow", "openwhisk", duration_ms=250, memory_mb=256),
        attempt(0, "client_0", "ow", "openwhisk", duration_ms=1234, attempt_no=2),  # memory from the config
        # Cloud Functions ($0.0000025/GB-s, $0.00001/GHz-s, $0.40/M, 100 ms steps)
        attempt(0, "client_1", "gc", "gcf", duration_ms=1000.0, memory_mb=1024),
        attempt(0, "client_1", "gc", "gcf", platform_id=None, state="failed", attempt_no=2),  # refused: unbilled
        attempt(1, "client_1", "gc", "gcf", duration_ms=0.4, memory_mb=2048),
        # Knative with the cluster's overrides (1 ms steps, own GB-s and invocation prices)
        attempt(1, "client_2", "kn", "knative", duration_ms=1500.5, memory_mb=1024),
        # lost: an invocation without a known duration
        attempt(1, "_fl_server_aggregator", "ow", "openwhisk", platform_id="lost", state="timed_out",
                function="fl_server_aggregator"),
    ])
    return store


def test_billed_duration_rounds_up_to_the_increment():
    assert billed_ms(260, 100) == 300          # the price sheet's own example
    assert billed_ms(300, 100) == 300
    assert billed_ms(300.0000001, 100) == 300  # clock noise is not another step
    assert billed_ms(300.01, 100) == 400
    assert billed_ms(0, 100) == 100            # a started invocation bills one step
    assert billed_ms(1500.5, 1) == 1501


def test_openwhisk_default_matches_the_price_sheet_example():
    # IBM's sheet: 256 MB, 500 ms, 5 million executions -> 625,000 GB-s,
    # $3.83 after the 400,000 GB-s free tier.
    one = attempt_charge({"platform_id": "a", "duration_ms": 500}, platform_prices("openwhisk"), 256)
    assert one.gb_seconds * 5_000_000 == pytest.approx(625_000)
    assert (one.gb_seconds * 5_000_000 - 400_000) * 0.000017 == pytest.approx(3.825)
    assert one.cost * 5_000_000 == pytest.approx(625_000 * 0.000017)


def test_session_cost_per_round_and_cluster_with_overrides(priced_session, mongo_url):
    cfg = parse_config(config_text(mongo_url, priced_session.db.name, KN_OVERRIDE))
    cost = session_cost(priced_session, SESSION, cfg)
    # ow: 0.25 GB x 0.3 s; 0.5 GB (config memory) x 1.3 s; the lost attempt bills nothing
    ow = 0.075 * 0.000017 + 0.65 * 0.000017
    # gc: 1 GB x 1 s + 1.4 GHz x 1 s + one invocation; 2 GB x 0.1 s + 2.4 GHz x 0.1 s + one invocation
    gc = (1.0 * 0.0000025 + 1.4 * 0.00001 + 0.4e-6) + (0.2 * 0.0000025 + 0.24 * 0.00001 + 0.4e-6)
    # kn: 1 GB x 1.501 s at the override, 1.4 GHz x 1.501 s at the default GHz price, $2/M
    kn = 1.501 * 0.00001 + 1.4 * 1.501 * 0.00001 + 2.0e-6
    assert cost["currency"] == "USD"
    assert cost["invocations"] == 6
    assert cost["total"] == pytest.approx(ow + gc + kn)
    assert cost["gb_seconds"] == pytest.approx(0.075 + 0.65 + 1.0 + 0.2 + 1.501)
    per_cluster = cost["per_cluster"]
    assert per_cluster["ow"]["cost"] == pytest.approx(ow) and per_cluster["ow"]["invocations"] == 3
    assert per_cluster["gc"]["cost"] == pytest.approx(gc) and per_cluster["gc"]["invocations"] == 2
    assert per_cluster["kn"]["cost"] == pytest.approx(kn) and per_cluster["kn"]["ghz_seconds"] == pytest.approx(2.1014)
    r0 = 0.075 * 0.000017 + 0.65 * 0.000017 + (1.0 * 0.0000025 + 1.4 * 0.00001 + 0.4e-6)
    assert sorted(cost["per_round"]) == [0, 1]
    assert cost["per_round"][0]["cost"] == pytest.approx(r0)
    assert cost["per_round"][1]["cost"] == pytest.approx(ow + gc + kn - r0)
    assert cost["per_round"][0]["invocations"] == 3 and cost["per_round"][1]["invocations"] == 3


def test_without_a_config_platform_defaults_and_default_memory_apply(priced_session):
    cost = session_cost(priced_session, SESSION)
    # the attempt without memory_mb falls back on fl_client's default of 1024 MB
    assert cost["per_cluster"]["ow"]["cost"] == pytest.approx((0.075 + 1.0 * 1.3) * 0.000017)
    # Knative's default is priced like Cloud Functions: 1600 ms of 1 GB and 1.4 GHz, plus $0.40/M
    assert cost["per_cluster"]["kn"]["cost"] == pytest.approx(1.6 * 0.0000025 + 1.4 * 1.6 * 0.00001 + 0.4e-6)


def test_clusters_priced_in_different_currencies_are_not_summed_as_one(priced_session, mongo_url):
    cfg = parse_config(config_text(mongo_url, priced_session.db.name,
                                   "{per_gb_second: 0.00002, currency: EUR}"))
    cost = session_cost(priced_session, SESSION, cfg)
    assert cost["currency"] == "mixed"
    assert cost["per_cluster"]["kn"]["currency"] == "EUR"
    assert cost["per_cluster"]["gc"]["currency"] == "USD"


def test_status_json_reports_the_cost(priced_session, mongo_url, tmp_path, isolated_dirs):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(config_text(mongo_url, priced_session.db.name, KN_OVERRIDE))
    res = CliRunner().invoke(cli, ["status", SESSION, "-c", str(cfg_path), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    expected = session_cost(priced_session, SESSION, parse_config(cfg_path.read_text()))
    assert data["cost"]["total"] == pytest.approx(expected["total"])
    # rounds counted from 1, as everywhere in status (the store's round 0 is round 1)
    assert set(data["cost"]["per_round"]) == {"1", "2"}
    assert data["cost"]["per_round"]["2"]["gb_seconds"] == pytest.approx(expected["per_round"][1]["gb_seconds"])


# -- attempts that never ran, and attempt documents with values that are not numbers

GCF = platform_prices("gcf")


@pytest.mark.parametrize("platform", ["gcf", "knative"])
@pytest.mark.parametrize("error_class", ["throttled", "unreachable", "function_missing"])
def test_http_attempts_that_never_ran_the_function_cost_nothing(platform, error_class):
    # What the HTTP invoker records for a 429, a refused connection or a
    # 404: the execution id the keeper made before sending, and its request time.
    never_ran = {"platform_id": "5f0c9d1e", "duration_ms": 12.5, "state": "failed", "error_class": error_class,
                 "cluster": "c", "platform": platform, "round": 0}
    assert attempt_charge(never_ran, platform_prices(platform), 1024) == Charge()
    cost = attempts_cost([never_ran], PriceBook())
    assert cost["invocations"] == 0 and cost["total"] == 0 and cost["gb_seconds"] == 0


@pytest.mark.parametrize("error_class", ["timeout", "platform_error", "application_error", "developer_error"])
def test_http_attempts_that_ran_and_failed_are_billed(error_class):
    ran = {"platform_id": "5f0c9d1e", "duration_ms": 150.0, "state": "failed", "error_class": error_class}
    charge = attempt_charge(ran, GCF, 1024)
    assert charge.invocations == 1 and charge.gb_seconds == pytest.approx(0.2)


def test_openwhisk_billing_is_unchanged():
    ow = platform_prices("openwhisk")
    # refused at submission: no activation id
    assert attempt_charge({"platform_id": None, "state": "failed", "error_class": "throttled"}, ow, 256) == Charge()
    # a failed activation bills its run; a lost one its invocation only
    failed = attempt_charge({"platform_id": "a", "duration_ms": 250, "error_class": "developer_error"}, ow, 256)
    assert failed.invocations == 1 and failed.gb_seconds == pytest.approx(0.075)
    lost = attempt_charge({"platform_id": "a", "state": "timed_out", "error_class": "timeout"}, ow, 256)
    assert lost.invocations == 1 and lost.gb_seconds == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "soon", [1]])
def test_a_duration_that_is_not_a_finite_number_counts_as_unmeasured(bad):
    charge = attempt_charge({"platform_id": "a", "duration_ms": bad}, GCF, 1024)
    assert charge.invocations == 1 and charge.gb_seconds == 0 and charge.cost == pytest.approx(0.4e-6)
    # without a platform id, nothing shows that it ran
    assert attempt_charge({"platform_id": None, "duration_ms": bad}, GCF, 1024) == Charge()


def test_attempts_without_a_usable_round_or_memory_count_in_no_round():
    attempts = [{"platform_id": "a", "duration_ms": 100, "round": rnd, "cluster": "c", "platform": "gcf",
                 "memory_mb": memory}
                for rnd, memory in [(None, 1024), (math.nan, 1024), ("x", 1024), (1.0, math.nan), (1, "lots"),
                                    (True, None)]]
    attempts.append({"platform_id": "a", "duration_ms": 100, "cluster": None, "platform": None})  # no round at all
    cost = attempts_cost(attempts, PriceBook())
    assert cost["invocations"] == 7
    assert sorted(cost["per_round"]) == [1] and cost["per_round"][1]["invocations"] == 2
    # bad memory falls back on fl_client's default of 1024 MB: 1 GB x 0.1 s each
    assert cost["per_round"][1]["gb_seconds"] == pytest.approx(0.2)
    assert sorted(cost["per_cluster"]) == ["", "c"]
