"""Read sweeps tracked in MLflow into pandas frames.

The layout is docs/architecture.md "Tracking conventions": one parent run per sweep (tag
``betadiff.role=sweep``) and one child run per trial (``betadiff.role=trial``) carrying
``betadiff.factor.<dotted.key>``, ``betadiff.seed`` and ``betadiff.budget`` tags and per-step metrics.

Every user-facing failure raises :class:`ReportError` with one line that names the file / key / URI and
lists what exists, so the CLI can print it and exit non-zero before any work starts.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

TAG_ROLE = "betadiff.role"
TAG_SWEEP = "betadiff.sweep"
TAG_FACTOR = "betadiff.factor."
TAG_SEED = "betadiff.seed"
TAG_BUDGET = "betadiff.budget"
TAG_PRUNED = "betadiff.pruned"
TAG_ERROR = "betadiff.error"
TAG_STATUS = "betadiff.status"
TAG_PARENT = "mlflow.parentRunId"
BUDGET_KEY = "train.steps"  # the config key whose value the budget tag mirrors
VALUE_KINDS = ("last", "best")  # plus "at:STEP"
DEFAULT_URI = "sqlite:///mlflow.db"

class ReportError(Exception):
    """A bad input (sweep, metric, key, URI): the message is one line meant for the user."""


def metric_mode(name: str) -> str | None:
    """Direction of a metric: "min", "max", or None when unknown (no best cell is marked then)."""
    from betadiff.config import METRIC_MODES  # the core's table; config.py imports no torch

    return METRIC_MODES.get(name)


def parse_value(value: str, source: str = "--value") -> tuple[str, int | None]:
    """``"last" | "best" | "at:STEP"`` -> (kind, step)."""
    if value in VALUE_KINDS:
        return value, None
    if value.startswith("at:") and value[3:].lstrip("-").isdigit():
        return "at", int(value[3:])
    raise ReportError(f"{source}: value must be last, best or at:STEP, got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# Sweep specification (the parts of the sweep file the report needs)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    experiment: str | None = None
    tracking_uri: str | None = None
    rows: tuple[str, ...] = ()
    cols: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    value: str = "last"
    seeds: tuple | None = None  # declared seeds; None when unknown
    source: str = ""  # file the spec came from (for error messages)


def _str_list(node, where: str) -> tuple[str, ...]:
    if node is None:
        return ()
    if isinstance(node, str):
        return (node,)
    if not isinstance(node, (list, tuple)) or not all(isinstance(x, str) for x in node):
        raise ReportError(f"{where}: expected a list of strings, got {node!r}")
    return tuple(node)


def spec_from_dict(d: dict, source: str) -> SweepSpec:
    """Validate the keys the report reads; ``source`` names the file in errors."""
    if not isinstance(d, dict):
        raise ReportError(f"{source}: expected a mapping at the top level")
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise ReportError(f"{source}: name: missing or not a string")
    tracking = d.get("tracking") or {}
    report = d.get("report") or {}
    if not isinstance(tracking, dict):
        raise ReportError(f"{source}: tracking: expected a mapping")
    if not isinstance(report, dict):
        raise ReportError(f"{source}: report: expected a mapping")
    value = report.get("value", "last")
    if value == "step":  # the sweep schema's spelling: value: step + step: N
        if not isinstance(report.get("step"), int):
            raise ReportError(f"{source}: report.step: an integer step is required when report.value is step")
        value = f"at:{report['step']}"
    if not isinstance(value, str):
        raise ReportError(f"{source}: report.value: expected last, best or at:STEP, got {value!r}")
    parse_value(value, f"{source}: report.value")
    seeds = d.get("seeds")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))  # a seed count means seeds 0..n-1
    if seeds is not None and not isinstance(seeds, (list, tuple)):
        raise ReportError(f"{source}: seeds: expected a list or a count, got {seeds!r}")
    return SweepSpec(
        name=name,
        experiment=tracking.get("experiment"),
        tracking_uri=tracking.get("uri"),
        rows=_str_list(report.get("rows"), f"{source}: report.rows"),
        cols=_str_list(report.get("cols"), f"{source}: report.cols"),
        metrics=_str_list(report.get("metrics"), f"{source}: report.metrics"),
        value=value,
        seeds=tuple(seeds) if seeds is not None else None,
        source=source,
    )


def read_sweep_file(path: str | Path) -> SweepSpec:
    """Read a sweep YAML: only ``name``, ``tracking``, ``report`` and ``seeds`` (the sweep layer owns the
    rest and validates it when the sweep runs)."""
    from omegaconf import OmegaConf

    path = Path(path)
    try:
        node = OmegaConf.load(path)
        d = OmegaConf.to_container(node, resolve=True)
    except Exception as e:  # YAML syntax / interpolation errors: one line with the file
        raise ReportError(f"{path}: cannot read sweep file: {str(e).splitlines()[0]}") from e
    return spec_from_dict(d, str(path))


def looks_like_file(sweep: str) -> bool:
    return sweep.endswith((".yaml", ".yml")) or os.sep in sweep


# ---------------------------------------------------------------------------------------------------------
# Tracking store


def resolve_tracking_uri(cli_uri: str | None, spec: SweepSpec | None = None) -> str:
    """--tracking-uri, then the sweep file's tracking.uri, then BETADIFF_TRACKING_URI / MLFLOW_TRACKING_URI,
    then sqlite:///mlflow.db; a relative sqlite path is taken from the cwd (as the sweep layer does)."""
    uri = (
        cli_uri
        or (spec.tracking_uri if spec else None)
        or os.environ.get("BETADIFF_TRACKING_URI")
        or os.environ.get("MLFLOW_TRACKING_URI")
        or DEFAULT_URI
    )
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast (well under 30 s) on a tracking URI that cannot answer, instead of MLflow's long retries.

    A missing sqlite/file store is an error too: MLflow would silently create an empty one.
    """
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # the server answered; /health may just not exist there
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ReportError(f"tracking URI {uri}: server unreachable ({reason})") from None
    elif scheme == "sqlite":
        path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
        if path and path != ":memory:" and not Path(path).is_file():
            raise ReportError(f"tracking URI {uri}: no such sqlite file {path!r}")
    elif scheme in ("postgresql", "mysql", "mssql"):
        import sqlalchemy

        args = {"connect_timeout": int(timeout)} if scheme in ("postgresql", "mysql") else {}
        try:
            sqlalchemy.create_engine(uri, connect_args=args).connect().close()
        except ModuleNotFoundError as e:  # SQLAlchemy 2.1 maps bare postgresql:// to psycopg 3
            raise ReportError(
                f"tracking URI {uri}: database driver {e.name!r} is not installed "
                f"(for PostgreSQL write postgresql+psycopg2://...)"
            ) from None
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ReportError(f"tracking URI {uri}: cannot connect ({first})") from None
    elif scheme in ("", "file"):
        raise ReportError(
            f"tracking URI {uri}: the file store is retired in MLflow 3; "
            f"use sqlite:///mlflow.db, a database URI or an http:// server"
        )


def connect(uri: str):
    """An MlflowClient on ``uri`` after a reachability check."""
    # Bounded HTTP retries: MLflow's defaults back off for minutes when a server dies mid-report.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    check_reachable(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    out, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string,
            max_results=1000,
            page_token=token,
            order_by=["attributes.start_time ASC"],
        )
        out.extend(page)
        token = page.token
        if not token:
            return out


def _tag_filter(key: str, value: str) -> str:
    return f"tags.`{key}` = '{value}'"


def list_sweeps(client) -> pd.DataFrame:
    """One row per sweep parent run: name, experiment, parent_run_id, status, start_time and trial counts
    by status (FINISHED, FAILED, KILLED, RUNNING, pruned)."""
    exps = {e.experiment_id: e.name for e in client.search_experiments()}
    parents = _search_all(client, list(exps), _tag_filter(TAG_ROLE, "sweep")) if exps else []
    rows = []
    for p in parents:
        trials = _search_all(client, [p.info.experiment_id], _tag_filter(TAG_PARENT, p.info.run_id))
        counts = Counter(t.info.status for t in trials)
        rows.append(
            dict(
                name=p.data.tags.get(TAG_SWEEP, p.info.run_name),
                experiment=exps[p.info.experiment_id],
                experiment_id=p.info.experiment_id,
                parent_run_id=p.info.run_id,
                status=p.data.tags.get(TAG_STATUS, p.info.status),
                start_time=p.info.start_time,
                trials=len(trials),
                finished=counts["FINISHED"],
                failed=counts["FAILED"],
                killed=counts["KILLED"],
                running=counts["RUNNING"],
                pruned=sum(t.data.tags.get(TAG_PRUNED) == "true" for t in trials),
            )
        )
    cols = [
        "name",
        "experiment",
        "experiment_id",
        "parent_run_id",
        "status",
        "start_time",
        "trials",
        "finished",
        "failed",
        "killed",
        "running",
        "pruned",
    ]
    return pd.DataFrame(rows, columns=cols).sort_values(
        ["name", "start_time"], kind="stable", ignore_index=True
    )


def typed(s: str):
    """Tag/param string -> bool/int/float when it parses as one (for sorting levels and numeric axes)."""
    if s in ("True", "true"):
        return True
    if s in ("False", "false"):
        return False
    for cast in (int, float):
        try:
            return cast(s)
        except (TypeError, ValueError):
            pass
    return s


def sort_levels(levels) -> list[str]:
    """Numeric order when every level is a number, else lexical; levels stay strings."""
    levels = sorted(set(levels))
    vals = [typed(v) for v in levels]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return [lv for _, lv in sorted(zip(vals, levels, strict=True))]
    return levels


@dataclass
class SweepRuns:
    """A sweep as tracked: the parent run and one row per trial run.

    ``runs`` columns: run_id, run_name, status, seed, budget, pruned, error, start_time, one column per
    varied factor (string values, as tagged), and ``metrics`` (dict of latest values).
    """

    spec: SweepSpec
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    factors: list[str]
    runs: pd.DataFrame
    client: object = field(repr=False, default=None)

    def available_metrics(self) -> list[str]:
        return sorted({k for m in self.runs["metrics"] for k in m})

    def levels(self, key: str) -> list[str]:
        return sort_levels(self.runs[key].dropna())

    def histories(self, metrics: list[str], run_ids: list[str] | None = None) -> pd.DataFrame:
        """Long frame (run_id, metric, step, value) sorted by run, metric, step; one value per step
        (the latest logged one when a step was logged twice, e.g. after a resume)."""
        ids = list(self.runs["run_id"]) if run_ids is None else run_ids
        recs = []
        for rid in ids:
            for m in metrics:
                hist = self.client.get_metric_history(rid, m)
                recs.extend((rid, m, h.step, h.timestamp, h.value) for h in hist)
        df = pd.DataFrame(recs, columns=["run_id", "metric", "step", "timestamp", "value"])
        df = df.sort_values(["run_id", "metric", "step", "timestamp"], kind="stable")
        df = df.drop_duplicates(["run_id", "metric", "step"], keep="last").drop(columns="timestamp")
        return df.reset_index(drop=True)

    def artifact(self, run_id: str, path: str, dst: str | Path) -> Path:
        """Download one artifact of a trial (or the parent) into ``dst``; returns the local path."""
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst)))


def _spec_from_parent(client, parent) -> SweepSpec:
    """The resolved sweep.yaml the sweep layer logs on its parent run, or a bare spec if absent."""
    import tempfile

    name = parent.data.tags.get(TAG_SWEEP, parent.info.run_name)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(parent.info.run_id, "sweep.yaml", tmp)
        except Exception:  # older parents / sweeps started outside the sweep layer
            return SweepSpec(name=name, source=f"run {parent.info.run_id}")
        spec = read_sweep_file(local)
    return SweepSpec(**{**spec.__dict__, "source": f"sweep.yaml of run {parent.info.run_id}"})


def load_sweep(
    sweep: str | SweepSpec, tracking_uri: str | None = None, client=None, experiment: str | None = None
) -> SweepRuns:
    """Find a sweep by YAML path or by name and read its trial runs.

    ``experiment`` (else the sweep file's tracking.experiment, else every experiment) narrows the search.
    Raises ReportError naming the sweeps / experiments that exist when the sweep or experiment is unknown.
    """
    if isinstance(sweep, SweepSpec):
        spec = sweep
    elif looks_like_file(sweep):
        if not Path(sweep).is_file():
            raise ReportError(f"{sweep}: no such sweep file")
        spec = read_sweep_file(sweep)
    else:
        spec = None
    uri = resolve_tracking_uri(tracking_uri, spec)
    client = client or connect(uri)
    exps = {e.name: e.experiment_id for e in client.search_experiments()}
    exp_name = experiment or (spec.experiment if spec is not None else None)
    if exp_name is not None:
        if exp_name not in exps:
            where = "--experiment" if experiment else f"{spec.source}: tracking.experiment"
            known = ", ".join(sorted(exps)) or "(none)"
            raise ReportError(f"{where}: no experiment {exp_name!r} at {uri}; experiments: {known}")
        exp_ids = [exps[exp_name]]
    else:
        exp_ids = list(exps.values())
    name = spec.name if spec is not None else sweep
    parents = (
        _search_all(client, exp_ids, f"{_tag_filter(TAG_ROLE, 'sweep')} and {_tag_filter(TAG_SWEEP, name)}")
        if exp_ids
        else []
    )
    if not parents:
        known = sorted(set(list_sweeps(client)["name"]))
        raise ReportError(f"sweep {name!r}: not found at {uri}; sweeps: {', '.join(known) or '(none)'}")
    parent = parents[-1]  # the newest run of that sweep (search is ordered by start time)
    if spec is None:
        spec = _spec_from_parent(client, parent)
    trials = _search_all(client, [parent.info.experiment_id], _tag_filter(TAG_PARENT, parent.info.run_id))
    trials = [t for t in trials if t.data.tags.get(TAG_ROLE, "trial") == "trial"]
    factors = sorted({k[len(TAG_FACTOR) :] for t in trials for k in t.data.tags if k.startswith(TAG_FACTOR)})
    recs = []
    for t in trials:
        tags = t.data.tags
        rec = dict(
            run_id=t.info.run_id,
            run_name=t.info.run_name,
            status=t.info.status,
            seed=tags.get(TAG_SEED),
            budget=tags.get(TAG_BUDGET, t.data.params.get(BUDGET_KEY)),
            pruned=tags.get(TAG_PRUNED) == "true",
            error=tags.get(TAG_ERROR),
            start_time=t.info.start_time,
            end_time=t.info.end_time,
            metrics=dict(t.data.metrics),
            params=dict(t.data.params),
        )
        for f in factors:  # tag first, the flattened-config param as fallback
            rec[f] = tags.get(TAG_FACTOR + f, t.data.params.get(f))
        recs.append(rec)
    cols = [
        "run_id",
        "run_name",
        "status",
        "seed",
        "budget",
        "pruned",
        "error",
        "start_time",
        "end_time",
        "metrics",
        "params",
        *factors,
    ]
    runs = pd.DataFrame(recs, columns=cols)
    return SweepRuns(
        spec=spec,
        tracking_uri=uri,
        experiment_id=parent.info.experiment_id,
        parent_run_id=parent.info.run_id,
        factors=factors,
        runs=runs,
        client=client,
    )


def get_run(client, run_id: str):
    """A run by id, or ReportError."""
    try:
        return client.get_run(run_id)
    except Exception as e:
        raise ReportError(f"run {run_id!r}: not found ({str(e).splitlines()[0][:120]})") from None


def json_dumps(obj) -> str:
    """Deterministic JSON (sorted keys, NaN -> null) for byte-identical exports."""
    return json.dumps(_nan_to_none(obj), sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def _nan_to_none(o):
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o
