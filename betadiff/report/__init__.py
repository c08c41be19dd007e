"""Report layer: ablation tables, run diffs, curve exports and figures from tracked sweeps (MLflow).

from betadiff.report import ablation
ab = ablation("sweeps/quickstart.yaml")        # or a sweep name; tracking URI from the file / env
ab.tidy, ab.table, ab.render("md")
"""

from betadiff.report.table import Ablation, ablation, aggregate, select_values
from betadiff.report.tracking import ReportError, SweepRuns, list_sweeps, load_sweep, metric_mode

__all__ = [
    "Ablation",
    "ablation",
    "aggregate",
    "select_values",
    "ReportError",
    "SweepRuns",
    "list_sweeps",
    "load_sweep",
    "metric_mode",
]
