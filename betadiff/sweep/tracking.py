"""MLflow side of a sweep (docs/architecture.md "Tracking conventions"); no Ray here.

Design: only the sweep driver writes to MLflow. Trials send their metrics to the driver through
`ray.tune.report`, and `callback.MlflowSweepCallback` logs them with one `log_batch` per report. With the
default SQLite store this keeps a single writer (SQLite locks under parallel writers), and worker nodes need
no access to the store at all.

Run identity: the parent run id is saved next to the Tune state (`<storage>/<name>/betadiff_sweep.json`);
a child run is found again by its tags (`betadiff.trial_id` under that parent) before one is created, so a
resumed sweep creates no duplicate runs.

Durability: every child-run write (creation, metrics, tags, status, artifacts, end) goes through one journal
(`SweepTracker.spool`, JSON lines). A write the server does not take is appended there, with copies of its
artifact files, and training goes on; the journal is sent oldest first before the next write gets through,
so a run's end never reaches the server before its points. A trial whose run could not be created is written
under a pending key (`trial:<trial_id>`) until the run exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from betadiff.provenance import git_commit

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT, TRIAL = "sweep", "trial"
PENDING = "trial:"  # prefix of the key that stands for a child run the server has not created yet


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
        self.spool: str | None = None  # journal of writes the server did not take (JSON lines, oldest first)
        self.retry_s = 0.0  # after a failed write, journal without trying the server for this long
        self.resolved: dict[str, str] = {}  # pending key "trial:<trial_id>" -> run id, once the run exists
        self._warned = False
        self._fails, self._retry_at = 0, 0.0
        self._client = None
        self._experiment_id: str | None = None

    def __getstate__(self) -> dict[str, Any]:  # a fresh process starts with a client and an outage of its own
        return {**self.__dict__, "_client": None, "_warned": False, "_fails": 0, "_retry_at": 0.0}

    def __setstate__(self, state: dict[str, Any]) -> None:  # a tracker pickled before the journal: defaults
        self.__dict__.update({"retry_s": 0.0, "resolved": {}, "_fails": 0, "_retry_at": 0.0, **state})

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
        c.set_terminated(rid, status=status if status in ("FINISHED", "KILLED") else "FAILED")

    # --- children ---------------------------------------------------------------------------------------
    def find_child(self, trial_id: str) -> str | None:
        run = self._child_run(trial_id, self.parent_run_id)
        return run.info.run_id if run is not None else None

    def existing_child(self, trial_id: str) -> str | None:
        """The trial's run if the server has one; None also while the server is away (journal pending or backing
        off): then no request waits on it, and `start_child` journals a lookup-or-create."""
        if time.monotonic() < self._retry_at or (self.spool is not None and Path(self.spool).exists()):
            return None
        try:
            return self.find_child(trial_id)
        except Exception:  # noqa: BLE001 - the server is away
            self._back_off()
            return None

    def _child_run(self, trial_id: str, parent: str | None):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`betadiff.trial_id` = '{_q(trial_id)}' and "
            f"tags.`mlflow.parentRunId` = '{parent}'",
            max_results=5,
        )
        return runs[0] if runs else None

    def last_logged_step(self, run_id: str) -> int:
        """The largest step of any metric the run has (-1: none, or the server is away)."""
        try:
            keys = list(self.client.get_run(run_id).data.metrics)
            return max((m.step for k in keys for m in self.client.get_metric_history(run_id, k)), default=-1)
        except Exception:  # noqa: BLE001 - the server is away: nothing to skip
            return -1

    def children(self) -> list:
        from mlflow.entities import ViewType

        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            run_view_type=ViewType.ALL,
            max_results=10000,
        )

    def start_child(self, trial_id: str, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        """The child run of `trial_id`: found by tag and set RUNNING again, or created with params.

        If the server is away, the creation is journalled and the pending key `trial:<trial_id>` is returned:
        writes to that key are journalled behind the creation and reach the run once it exists
        (`resolved` maps the key to the run id from then on)."""
        key = PENDING + trial_id
        op = {
            "op": "child",
            "run_id": key,
            "trial_id": trial_id,
            "parent": self.parent_run_id,
            "run_name": run_name,
            "tags": {k: str(v) for k, v in tags.items()},
            "params": {k: str(v)[:6000] for k, v in sorted(params.items())},
        }
        self._write([op])
        return self.resolved.get(key, key)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """One report's metrics (durable: see `_write`)."""
        self.log_metric_steps(run_id, [(step, metrics)])

    def log_metric_steps(self, run_id: str, steps: list[tuple[int, dict[str, float]]]) -> None:
        """Several steps' metrics of one run, sent as one log_batch (durable: see `_write`)."""
        ops = [{"op": "metrics", "run_id": run_id, "step": int(step), "ts": _now_ms(),
                "metrics": {k: float(v) for k, v in metrics.items()}} for step, metrics in steps if metrics]
        if ops:
            self._write(ops)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        if tags:
            self._write([{"op": "tags", "run_id": run_id, "tags": {k: str(v) for k, v in tags.items()}}])

    def run_status(self, run_id: str) -> str | None:
        """The run's status in MLflow, or None (a pending run, or the server cannot say right now)."""
        if is_pending(run_id):
            return None
        try:
            return self.client.get_run(run_id).info.status
        except Exception:  # noqa: BLE001 - unknown is fine: the caller then writes as usual (journalled)
            return None

    def set_status(self, run_id: str, status: str) -> None:
        self._write([{"op": "status", "run_id": run_id, "status": status}])

    def log_artifacts(self, run_id: str, directory: str | Path, names: tuple[str, ...]) -> None:
        """Log the files `names` of `directory` that exist; if they cannot be sent now, copies are kept beside
        the journal (the directory may be a Tune checkpoint that Tune deletes later)."""
        files = [str(Path(directory) / n) for n in names if (Path(directory) / n).exists()]
        if files:
            self._write([{"op": "artifact", "run_id": run_id, "files": files}])

    def end_child(self, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
        ops = [{"op": "tags", "run_id": run_id, "tags": {k: str(v) for k, v in tags.items()}}] if tags else []
        self._write(ops + [{"op": "terminate", "run_id": run_id, "status": status, "ts": _now_ms()}])

    # --- durable writes: the journal --------------------------------------------------------------------
    # Every child-run write above is one operation (a dict with "op"). `_write` sends it after whatever the
    # journal (`spool`, JSON lines) already holds, so the server sees all writes in the order they were made;
    # what the server does not take is appended to the journal and training goes on. Resending is safe:
    # MLflow ignores a metric point it already has, tags, statuses and artifacts overwrite, and a child run
    # is looked up by its tags before one is created.

    @property
    def artifact_dir(self) -> Path | None:
        """Where copies of journalled artifact files are kept (deleted once written)."""
        return Path(self.spool).parent / "unwritten_artifacts" if self.spool else None

    def _write(self, ops: list[dict[str, Any]]) -> None:
        """Send `ops` in order after the journal; journal them instead if the server does not take them."""
        if self.spool is None:  # no journal: errors go to the caller
            i = 0
            while i < len(ops):
                i = self._apply_from(ops, i)
            return
        if time.monotonic() < self._retry_at:  # a write failed moments ago: do not wait on the server again
            self._keep(ops)
            return
        try:
            self.flush_spool(raise_errors=True)
        except Exception as e:  # noqa: BLE001 - any transport/server error: keep the writes, never lose them
            self._keep(ops, e)
            return
        i = 0
        while i < len(ops):
            try:
                i = self._apply_from(ops, i)
            except Exception as e:  # noqa: BLE001
                self._back_off()
                self._keep(ops[i:], e)
                return

    def flush_spool(self, raise_errors: bool = False) -> int:
        """Send the journalled writes oldest first; at the first failure keep it and the rest.

        Returns how many operations are still unwritten (0 when all went through). Always tries the server,
        whatever `retry_s` says."""
        if self.spool is None or not Path(self.spool).exists():
            return 0
        ops = read_journal(self.spool)
        i = 0
        try:
            while i < len(ops):
                i = self._apply_from(ops, i)
        except Exception:
            Path(self.spool).write_text("".join(json.dumps(op) + "\n" for op in ops[i:]))
            self._back_off()
            if raise_errors:
                raise
            return len(ops) - i
        Path(self.spool).unlink()
        self._fails, self._retry_at = 0, 0.0
        if self._warned:
            self._warned = False
            print(f"betadiff: MLflow writes resumed; {len(ops)} kept operation(s) from {self.spool} written",
                  flush=True)
        return 0

    def _back_off(self) -> None:
        """A write failed: journal without trying for `retry_s`, doubled per failure in a row (up to 8x)."""
        self._fails += 1
        self._retry_at = time.monotonic() + self.retry_s * min(2 ** (self._fails - 1), 8)

    def _keep(self, ops: list[dict[str, Any]], err: Exception | None = None) -> None:
        """Append `ops` to the journal (artifact files copied beside it first); one warning per outage."""
        with open(self.spool, "a") as f:
            for op in ops:
                f.write(json.dumps(self._stash(op) if op["op"] == "artifact" else op) + "\n")
        if not self._warned:
            self._warned = True
            why = f" ({error_line(str(err))})" if err is not None else ""
            print(f"betadiff: warning: MLflow write failed{why}; unwritten metrics, tags, run statuses and "
                  f"artifacts are kept in {self.spool} and retried with later writes", flush=True)

    def _stash(self, op: dict[str, Any]) -> dict[str, Any]:
        """The artifact operation with its files copied to a folder of their own under `artifact_dir`."""
        if op.get("kept"):
            return op
        run = re.sub(r"[^\w.-]", "_", op["run_id"])
        d = self.artifact_dir / run / f"{time.time_ns()}-{uuid.uuid4().hex[:6]}"
        d.mkdir(parents=True)
        files = [shutil.copy2(src, d / Path(src).name) for src in op["files"] if Path(src).exists()]
        return {**op, "files": [str(p) for p in files], "kept": str(d)}

    def _apply_from(self, ops: list[dict[str, Any]], i: int) -> int:
        """Apply ops[i]; metric batches of one run in a row go as one log_batch. Returns the next index."""
        op = ops[i]
        if op["op"] != "metrics":
            self._apply(op)
            return i + 1
        j, n = i + 1, len(op["metrics"])
        while j < len(ops) and ops[j]["op"] == "metrics" and ops[j]["run_id"] == op["run_id"]:
            n += len(ops[j]["metrics"])
            if n > 1000:  # MLflow's log_batch limit
                break
            j += 1
        self._send_metrics(self._resolve(op["run_id"]), ops[i:j])
        return j

    def _apply(self, op: dict[str, Any]) -> None:
        """Send one journal operation to the server."""
        kind = op["op"]
        if kind == "child":
            self._open_child(op)
            return
        rid, c = self._resolve(op["run_id"]), self.client
        if kind == "metrics":
            self._send_metrics(rid, [op])
        elif kind == "tags":
            from mlflow.entities import RunTag

            c.log_batch(rid, tags=[RunTag(k, v) for k, v in op["tags"].items()], synchronous=True)
        elif kind == "status":
            c.update_run(rid, status=op["status"])
        elif kind == "terminate":
            c.set_terminated(rid, status=op["status"], end_time=op["ts"])
        elif kind == "artifact":
            self._send_artifacts(rid, op)
        else:
            raise TrackingError(f"{self.spool}: unknown operation {kind!r}")

    def _send_metrics(self, run_id: str, batches: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        ms = [Metric(k, v, b["ts"], b["step"]) for b in batches for k, v in b["metrics"].items()]
        self.client.log_batch(run_id, metrics=ms, synchronous=True)

    def _send_artifacts(self, run_id: str, op: dict[str, Any]) -> None:
        """Log the operation's files; a kept copy that is already gone was written before (then deleted)."""
        for p in op["files"]:
            if Path(p).exists():
                self.client.log_artifact(run_id, p)
        if op.get("kept"):
            shutil.rmtree(op["kept"], ignore_errors=True)

    def _open_child(self, op: dict[str, Any]) -> str:
        """Find (by tag) or create the child run of a "child" operation; returns its run id."""
        from mlflow.entities import Param

        c, parent = self.client, op.get("parent") or self.parent_run_id
        run = self._child_run(op["trial_id"], parent)
        if run is not None:
            rid, have = run.info.run_id, run.data.params
            c.update_run(rid, status="RUNNING")
        else:
            tags = {"mlflow.parentRunId": parent, "betadiff.role": TRIAL, "betadiff.sweep": self.sweep_name,
                    "betadiff.trial_id": op["trial_id"], **op["tags"]}
            rid, have = c.create_run(self.experiment_id, run_name=op["run_name"], tags=tags).info.run_id, {}
        ps = [Param(k, v) for k, v in op["params"].items() if k not in have]  # a create may have lost them
        for i in range(0, len(ps), 100):  # MLflow's batch limit is 100 params
            c.log_batch(rid, params=ps[i : i + 100], synchronous=True)
        self.resolved[op["run_id"]] = rid
        return rid

    def _resolve(self, run_id: str) -> str:
        """The run id of `run_id`, or of the child run a pending key `trial:<trial_id>` stands for."""
        if not is_pending(run_id):
            return run_id
        if run_id not in self.resolved:
            rid = self.find_child(run_id[len(PENDING) :])
            if rid is None:
                raise TrackingError(f"no MLflow run yet for {run_id}")
            self.resolved[run_id] = rid
        return self.resolved[run_id]


def _now_ms() -> int:
    return int(time.time() * 1000)


def is_pending(run_id: str) -> bool:
    """A key `trial:<trial_id>` that stands for a child run not created yet (the server was away)."""
    return run_id.startswith(PENDING)


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    """The operations in a journal file; a line without "op" is a metric batch (the older spool format)."""
    ops = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    return [op if "op" in op else {"op": "metrics", **op} for op in ops]
