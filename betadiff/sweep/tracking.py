"""MLflow side of a sweep (docs/architecture.md "Tracking conventions"); no Ray here.

Design: only the sweep driver writes to MLflow. Trials send their metrics to the driver through
`ray.tune.report`, and `callback.MlflowSweepCallback` logs them with one `log_batch` per report. With the
default SQLite store this keeps a single writer (SQLite locks under parallel writers), and worker nodes need
no access to the store at all.

Run identity: the parent run id is saved next to the Tune state (`<storage>/<name>/betadiff_sweep.json`);
a child run is found again by its tags (`betadiff.trial_id` under that parent) before one is created, so a
resumed sweep creates no duplicate runs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT, TRIAL = "sweep", "trial"


class TrackingError(RuntimeError):
    """The tracking store cannot be used (one line)."""


def resolve_tracking_uri(uri: str | None = None, cwd: str | Path | None = None) -> str:
    """The sweep's tracking URI; a relative SQLite path is made absolute (the driver may run elsewhere)."""
    uri = (
        uri or os.environ.get("BETADIFF_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    )
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        uri = "sqlite:///" + str((Path(cwd or os.getcwd()) / rel).resolve())
    return uri


def _tcp_reachable(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot connect to {host}:{port} ({e.strerror or e})"


def preflight(uri: str, timeout: float = 10.0) -> None:
    """Fail fast (well under 30 s) with one line when the store at `uri` cannot be reached or opened."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout)))
    p = urlparse(uri)
    if p.scheme in ("http", "https"):
        port = p.port or (443 if p.scheme == "https" else 80)
        err = _tcp_reachable(p.hostname or "localhost", port, timeout)
        if err:
            raise TrackingError(f"tracking URI {uri}: {err}")
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
        except Exception as e:
            raise TrackingError(f"tracking URI {uri}: not an MLflow server ({e})") from None
    elif p.scheme.startswith("postgresql") or p.scheme.startswith("mysql"):
        err = _tcp_reachable(
            p.hostname or "localhost", p.port or (5432 if "postgres" in p.scheme else 3306), timeout
        )
        if err:
            raise TrackingError(f"tracking URI {uri}: {err}")
    elif p.scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :])
        if not path.parent.is_dir():
            raise TrackingError(f"tracking URI {uri}: directory {path.parent} does not exist")
    elif p.scheme in ("", "file"):
        raise TrackingError(
            f"tracking URI {uri}: the file store is retired in MLflow 3; "
            f"use sqlite:///mlflow.db or an http:// server"
        )


def sqlite_warning(uri: str, concurrent: int) -> str | None:
    if uri.startswith("sqlite:") and concurrent > 4:
        return (
            f"warning: {concurrent} concurrent trials on SQLite ({uri}): only this driver writes, but "
            f"readers (dashboard, reports) may see 'database is locked'; prefer an MLflow server "
            f"(http://, PostgreSQL-backed) for large sweeps"
        )
    return None


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def error_line(text: str) -> str:
    """The exception line of a traceback ('NonFiniteLossError: step 12 ...'), bounded in length."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    hits = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", ln)]
    return (hits[-1] if hits else (lines[-1] if lines else "unknown error"))[:500]


def _q(s: str) -> str:
    return s.replace("'", "\\'")


class SweepTracker:
    """MLflow operations of one sweep. Picklable (holds only strings; the client is made on demand)."""

    def __init__(self, uri: str, experiment: str, sweep_name: str):
        self.uri, self.experiment, self.sweep_name = uri, experiment, sweep_name
        self.parent_run_id: str | None = None
        self.spool: str | None = None  # file of metric batches the server did not take (JSON lines)
        self._warned = False
        self._client = None
        self._experiment_id: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(self.experiment)
                except Exception:  # created concurrently by another sweep
                    self._experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
            else:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    # --- parent -----------------------------------------------------------------------------------------
    def start_parent(self, sweep_hash: str, resolved_yaml: str, parent_run_id: str | None = None) -> str:
        """Re-attach to `parent_run_id` (resume) or create the sweep's parent run; returns its id."""
        c = self.client
        if parent_run_id:
            c.update_run(parent_run_id, status="RUNNING")
            c.set_tag(parent_run_id, "betadiff.status", "RUNNING")
            self.parent_run_id = parent_run_id
            return parent_run_id
        run = c.create_run(
            self.experiment_id,
            run_name=self.sweep_name,
            tags={
                "betadiff.role": PARENT,
                "betadiff.sweep": self.sweep_name,
                "betadiff.sweep_hash": sweep_hash,
                "betadiff.status": "RUNNING",
                "betadiff.git_commit": git_commit(),
            },
        )
        self.parent_run_id = run.info.run_id
        c.log_text(self.parent_run_id, resolved_yaml, "sweep.yaml")
        return self.parent_run_id

    def finish_parent(self, status: str, best: dict[str, Any] | None, report_md: str | None) -> None:
        c, rid = self.client, self.parent_run_id
        if best is not None:
            c.set_tag(rid, "betadiff.best_config", json.dumps(best, sort_keys=True, default=str))
        if report_md:
            c.log_text(rid, report_md, "report.md")
        c.set_tag(rid, "betadiff.status", status)
        c.set_terminated(rid, status="FINISHED" if status == "FINISHED" else "FAILED")

    # --- children ---------------------------------------------------------------------------------------
    def find_child(self, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`betadiff.trial_id` = '{_q(trial_id)}' and "
            f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=5,
        )
        return runs[0].info.run_id if runs else None

    def children(self) -> list:
        from mlflow.entities import ViewType

        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            run_view_type=ViewType.ALL,
            max_results=10000,
        )

    def start_child(self, trial_id: str, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        """The child run of `trial_id`: found by tag and set RUNNING again, or created with params."""
        from mlflow.entities import Param

        c = self.client
        rid = self.find_child(trial_id)
        if rid is not None:
            c.update_run(rid, status="RUNNING")
            return rid
        run = c.create_run(
            self.experiment_id,
            run_name=run_name,
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                "betadiff.role": TRIAL,
                "betadiff.sweep": self.sweep_name,
                "betadiff.trial_id": trial_id,
                **tags,
            },
        )
        rid = run.info.run_id
        ps = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(ps), 100):  # MLflow's batch limit is 100 params
            c.log_batch(rid, params=ps[i : i + 100])
        return rid

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """One log_batch per report. If the server is away, the points go to the spool file (training goes on)
        and are sent, oldest first, with the next batch that gets through or by `flush_spool`."""
        if not metrics:
            return
        batch = {"run_id": run_id, "step": int(step), "ts": int(time.time() * 1000),
                 "metrics": {k: float(v) for k, v in metrics.items()}}
        try:
            self.flush_spool(raise_errors=True)
            self._send(batch)
        except Exception as e:  # noqa: BLE001 - any transport/server error: keep the points, never lose them
            if self.spool is None:
                raise
            with open(self.spool, "a") as f:
                f.write(json.dumps(batch) + "\n")
            if not self._warned:
                self._warned = True
                print(f"betadiff: warning: MLflow write failed ({error_line(str(e))}); metric points are kept in "
                      f"{self.spool} and retried with the next report", flush=True)

    def _send(self, batch: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        ms = [Metric(k, v, batch["ts"], batch["step"]) for k, v in batch["metrics"].items()]
        self.client.log_batch(batch["run_id"], metrics=ms, synchronous=True)

    def flush_spool(self, raise_errors: bool = False) -> int:
        """Send the spooled metric batches; returns how many are still unwritten (0 when all went through)."""
        if self.spool is None or not Path(self.spool).exists():
            return 0
        batches = [json.loads(ln) for ln in Path(self.spool).read_text().splitlines() if ln.strip()]
        for i, b in enumerate(batches):
            try:
                self._send(b)
            except Exception:
                Path(self.spool).write_text("".join(json.dumps(x) + "\n" for x in batches[i:]))
                if raise_errors:
                    raise
                return len(batches) - i
        Path(self.spool).unlink()
        return 0

    def log_artifacts(self, run_id: str, directory: str | Path, names: tuple[str, ...]) -> None:
        for n in names:
            p = Path(directory) / n
            if p.exists():
                self.client.log_artifact(run_id, str(p))

    def end_child(self, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
        for k, v in (tags or {}).items():
            self.client.set_tag(run_id, k, v)
        self.client.set_terminated(run_id, status=status)
