"""Every table the command line prints stays readable at 80 columns (a
pipe, a CI log, a narrow terminal): no value is cut, whether the table
fits as a grid or falls back to `column: value` blocks."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from fedkeeper.check import ClusterCheck
from fedkeeper.cli.check import COLUMNS as CHECK_COLUMNS, check_rows
from fedkeeper.cli.common import table
from fedkeeper.cli.metrics import metrics_cells
from fedkeeper.cli.start import SUMMARY_COLUMNS, summary_cells
from fedkeeper.cli.status import status_table
from fedkeeper.insights import tables as insights_tables
from fedkeeper.providers.prometheus import ClusterMetrics
from fedkeeper.sweep import DISPLAY_COLUMNS, display_cells


def render(renderable, width: int = 80) -> str:
    out = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    out.print(renderable)
    return out.file.getvalue()


def squeeze(text: str) -> str:
    """The text without the line breaks and box drawing a layout adds."""
    return "".join(ch for ch in text if not ch.isspace() and ch not in "│┃┏┓┗┛┡┩└┘├┤┬┴┼━─╇╈╋┳┻═║╔╗╚╝")


def assert_whole(text: str, values) -> None:
    assert "…" not in text
    flat = squeeze(text)  # headers may wrap at spaces; values never do
    for v in values:
        assert squeeze(str(v)) in flat, f"{v!r} is not whole in:\n{text}"


LONG_LOG = "/home/someone/projects/federated/experiments/.state/logs/fedkeeper-20261130-091054-a1b2c3.log"


def test_status_at_80_columns():
    data = {"session": "fedkeeper-20261130-091054-a1b2c3", "state": "interrupted", "rounds": [
        {"round": i + 1, "state": "done", "selected": 10, "done": 10, "failed": 0, "in_flight": 0, "retrying": 0,
         "retries": 12, "duration_s": 123.4, "accuracy": 0.91234} for i in range(12)]}
    text = render(status_table(data, 80))
    assert_whole(text, ["interrupted", "10/10", "123.4", "0.9123", data["session"]])
    assert "12" in text


def test_start_summary_at_80_columns_keeps_the_run_log_path():
    result = {"session": "s", "state": "finished", "rounds": 12, "rounds_planned": 12, "final_accuracy": 0.9,
              "wall_time_s": 39.5, "cost": 0.0001234, "currency": "USD", "run_log": LONG_LOG}
    text = render(table("session s: finished", SUMMARY_COLUMNS, [summary_cells(result)], width=80))
    assert_whole(text, [LONG_LOG, "12/12", "39.5s", "0.9000"])


def test_sweep_results_at_80_columns():
    rows = [{"params": {"lr": "1e-2", "optim": "adam", "local_epochs": "1"}, "repeat": 0,
             "session": "sweep-1d8d146e3449-000", "state": "finished", "rounds": 10, "rounds_to_target": 4,
             "time_to_target_s": 41.25, "final_accuracy": 0.9312, "invocations": 120, "retries": 3,
             "cost": 0.0012, "currency": "USD"}]
    text = render(table("sweep x", DISPLAY_COLUMNS, [display_cells(r) for r in rows], width=80))
    assert_whole(text, ["lr=1e-2 optim=adam local_epochs=1", "sweep-1d8d146e3449-000", "41.2", "0.9312",
                        "invocations"])


@pytest.mark.parametrize("what,data", [
    ("contributions", {"rounds": [3, 4], "rows": [
        {"round": 4, "client": "client_17", "trained_from": 3, "status": "rejected", "num_examples": 6000,
         "share": 0.125, "loss": 0.4321, "norm": 12.345, "z": 3.21, "cosine": -0.123,
         "flags": ["outlier_norm", "opposite_direction"], "reason": "update is not finite"}]}),
    ("clusters", {"k": 2, "k_chosen_by": "silhouette", "silhouette": 0.61, "silhouette_by_k": {"2": 0.61, "3": 0.4},
                  "groups": [{"group": 0, "size": 3, "mean_cosine": 0.93,
                              "clients": ["client_0", "client_1", "client_2"]}]}),
    ("reliability", {"clients": {"client_0": {"cluster": "local_ow", "attempts": 12, "success_rate": 0.75,
                                              "timeouts": 2, "cold_start_rate": 0.25, "p50_ms": 1234.5,
                                              "p95_ms": 2345.6}},
                     "clusters": {"local_ow": {"platform": "openwhisk", "attempts": 12, "success_rate": 0.75,
                                               "timeouts": 2, "cold_start_rate": 0.25, "p50_ms": 1234.5,
                                               "p95_ms": 2345.6}}}),
])
def test_insights_at_80_columns(what, data):
    specs = insights_tables({"what": what, "session": "fedkeeper-20261130-091054-a1b2c3", "data": data})
    text = "".join(render(table(s.title, s.columns, s.rows, width=80, right=s.right, caption=s.caption))
                   for s in specs)
    values = {"contributions": ["client_17", "rejected", "12.5%", "outlier_norm, opposite_direction",
                                "update is not finite", "6000", "cosine"],
              "clusters": ["client_0, client_1, client_2"],
              "reliability": ["client_0", "local_ow", "openwhisk", "75.0%", "1234.5", "2345.6"]}[what]
    assert_whole(text, values)


def test_metrics_at_80_columns():
    rows = [ClusterMetrics("gcf_europe_west1", "http://prometheus.monitoring.svc:9090", "openwhisk", "1h",
                           activations=1234.0, cold_starts=12.0, errors=1.0, error_rate=0.0008,
                           duration_p50_s=1.234, duration_p95_s=4.567, duration_mean_s=2.0,
                           note="no per-action metrics on this platform").row()]
    cols, cells = metrics_cells(rows)
    text = render(table("cluster metrics (last 1h)", cols, cells, width=80))
    assert_whole(text, ["gcf_europe_west1", "http://prometheus.monitoring.svc:9090", "1234.000", "4.567",
                        "no per-action metrics on this platform"])


def test_check_at_80_columns():
    results = [ClusterCheck("local_openwhisk_cluster", "openwhisk", ok=True, deploy_s=12.34, cold_ms=2345.0,
                            warm_ms=12.0, host={"hostname": "worker-node-17.example.internal", "cpu_count": 16,
                                                "memory_total_mb": 65536, "python": "3.11.7"}),
               ClusterCheck("gcf", "google", ok=False, stage="invoke",
                            error="HTTP 503 from https://europe-west1-project.cloudfunctions.net/nodeinfo")]
    text = render(table("cluster check (nodeinfo)", CHECK_COLUMNS, check_rows(results), width=80))
    assert_whole(text, ["local_openwhisk_cluster", "worker-node-17.example.internal 16 cpu 64.0 GiB py3.11.7",
                        "invoke failed: HTTP 503 from https://europe-west1-project.cloudfunctions.net/nodeinfo",
                        "12.34", "2345"])


def test_a_table_that_fits_stays_a_grid():
    text = render(table("t", ("a", "b"), [["1", "2"]], width=80))
    assert "┃" in text or "│" in text
    assert "a:" not in text


def test_terminal_numbers_share_one_format():
    """The model list, the sweep table and the sweep's progress lines print
    numbers with one helper: floats with fixed decimals, counts whole,
    "-" for what is missing."""
    from fedkeeper.cli.model import model_cells
    from fedkeeper.formatting import fixed_decimals
    assert [fixed_decimals(v) for v in (0.93124, 1.5, 0.0, 7, None)] == ["0.9312", "1.5000", "0.0000", "7", "-"]
    assert fixed_decimals(41.25, 1) == "41.2"
    row = {"round": 3, "accuracy": 0.91234, "loss": 0.25, "examples": 600, "clients": None, "strategy": "fedavg",
           "bytes": 2048, "validations": [{"data": "mnist", "metrics": {"accuracy": 0.5}}], "trail": None}
    assert model_cells([row])[0][:8] == ["3", "0.9123", "0.2500", "600", "-", "fedavg", "2.0 KB", "mnist: 0.5000"]
    sweep_row = {"params": {"lr": "1e-2"}, "repeat": 0, "session": "s", "state": "finished", "rounds": 10,
                 "rounds_to_target": None, "time_to_target_s": 41.25, "final_accuracy": 0.9, "invocations": 120,
                 "retries": 3, "cost": None}
    assert display_cells(sweep_row)[4:10] == ["10", "-", "41.2", "0.9000", "120", "3"]
