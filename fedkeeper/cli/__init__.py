"""`fedkeeper` command line: one module per command group, the helpers they
share in `common` (docs/cli.md).

Exit status: 0 success, 1 a run failed (a cluster, a round, a session),
2 bad input (config, flags). Bad input never shows a traceback.

A new command group is a module here plus one import and one
`main.add_command` line below.
"""
from __future__ import annotations

import click

from .check import check_cmd
from .cluster import cluster_group
from .common import UsageFailure, fail, load, open_runtime, select_clusters
from .config import config_group
from .deploy import deploy_cmd, remove_cmd, run_deploy
from .fabric import fabric_group
from .insights import insights_cmd
from .metrics import metrics_cmd
from .model import model_group
from .report import report_cmd
from .runtime import runtime_group
from .start import run_start, session_metrics, start_cmd
from .status import status_cmd
from .sweep import sweep_cmd

__all__ = ["UsageFailure", "fail", "load", "main", "open_runtime", "run_deploy", "run_start",
           "select_clusters", "session_metrics"]

# The name the tests and older callers used for it.
_session_metrics = session_metrics


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fedkeeper")
def main() -> None:
    """Federated learning over serverless platforms."""


main.add_command(config_group)
main.add_command(deploy_cmd)
main.add_command(remove_cmd)
main.add_command(start_cmd)
main.add_command(status_cmd)
main.add_command(metrics_cmd)
main.add_command(check_cmd)
main.add_command(cluster_group)
main.add_command(fabric_group)
main.add_command(report_cmd)
main.add_command(sweep_cmd)
main.add_command(insights_cmd)
main.add_command(model_group)
main.add_command(runtime_group)
