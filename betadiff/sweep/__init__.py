"""Sweep layer: sweep YAML → Ray Tune trials (Optuna, ASHA) tracked as MLflow parent/child runs.

Only this package (and `betadiff.report`) may import ray, optuna or mlflow; they are imported when a sweep
is validated against a cluster, run or submitted, never by `import betadiff` or `import betadiff.sweep`.
Entry point: `betadiff sweep ...` → `betadiff.sweep.cli:main`.
"""

from betadiff.sweep.schema import Sweep, SweepError, load_sweep

__all__ = ["Sweep", "SweepError", "load_sweep"]
