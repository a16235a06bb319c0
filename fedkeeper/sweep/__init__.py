"""Parameter sweeps: every combination of a grid, repeated with one seed per
repeat, each run its own training session (docs/sweeps.md).

A sweep is planned in full before anything runs: every combination becomes
a Config that passed the same validation as a config file, so a bad key or
value stops the sweep before the first session. Its document in the store
(collection `sweeps`) lists every run with its parameters, repeat, seed and
deterministic session id; the sweep id is a hash of the config, grid and
repeats. Running the same command again therefore finds the same document
and the same sessions: finished sessions are skipped, unfinished ones are
resumed where the keeper left them.
"""
from __future__ import annotations

from .plan import (FIXED_PATHS, GRID_ALIASES, GridAxis, Run, SweepError, SweepPlan, content_hash, parse_grid,
                   parse_value, plan_sweep, resolve_path)
from .results import (DISPLAY_COLUMNS, RESULT_COLUMNS, display_cells, render_csv, render_markdown, result_rows,
                      session_result)
from .runner import Sweep

__all__ = ["DISPLAY_COLUMNS", "FIXED_PATHS", "GRID_ALIASES", "RESULT_COLUMNS", "GridAxis", "Run", "Sweep",
           "SweepError", "SweepPlan", "content_hash", "display_cells", "parse_grid", "parse_value", "plan_sweep",
           "render_csv", "render_markdown", "resolve_path", "result_rows", "session_result"]
