"""Run-level tools: configuration diff of two runs and export of per-step curves."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from betadiff.report.tracking import ReportError, SweepRuns, get_run

_DIFF_TAG_PREFIX = "betadiff."


def config_diff(client, run_a: str, run_b: str) -> pd.DataFrame:
    """Params (flattened config) and ``betadiff.*`` tags that differ between two runs.

    Returns columns kind ("param" | "tag"), key, a, b (None where a run lacks the key), sorted by kind, key.
    """
    ra, rb = get_run(client, run_a), get_run(client, run_b)
    recs = []
    for kind, da, db in (
        ("param", ra.data.params, rb.data.params),
        (
            "tag",
            *({k: v for k, v in r.data.tags.items() if k.startswith(_DIFF_TAG_PREFIX)} for r in (ra, rb)),
        ),
    ):
        for k in sorted(set(da) | set(db)):
            if da.get(k) != db.get(k):
                recs.append((kind, k, da.get(k), db.get(k)))
    return pd.DataFrame(recs, columns=["kind", "key", "a", "b"])


def format_diff(diff: pd.DataFrame, run_a: str, run_b: str) -> str:
    """Aligned text: one line per differing key, ``-`` where a run lacks it."""
    if diff.empty:
        return f"runs {run_a} and {run_b}: same configuration\n"
    rows = [("", "key", run_a[:12], run_b[:12])] + [
        (k[0], key, "-" if a is None else a, "-" if b is None else b)
        for k, key, a, b in diff.itertuples(index=False)
    ]
    w = [max(len(str(r[i])) for r in rows) for i in range(4)]
    return "".join(" ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip() + "\n" for r in rows)


def curves_frame(sr: SweepRuns, metrics: list[str] | None = None) -> pd.DataFrame:
    """Every trial's per-step values: run_id, status, seed, budget, factors..., metric, step, value."""
    available = sr.available_metrics()
    metrics = metrics or available
    bad = [m for m in metrics if m not in available]
    if bad:
        raise ReportError(
            f"--metrics: {', '.join(map(repr, bad))} not logged by sweep {sr.spec.name!r}; "
            f"metrics: {', '.join(available) or '(none)'}"
        )
    hist = sr.histories(metrics)
    meta = sr.runs[["run_id", "status", "seed", "budget", *sr.factors]]
    return meta.merge(hist, on="run_id", how="inner").sort_values(
        ["run_id", "metric", "step"], kind="stable", ignore_index=True
    )


def write_frame(df: pd.DataFrame, path: str | Path | None) -> str | None:
    """CSV to stdout text (path None) or to ``path``; Parquet when the suffix is .parquet."""
    if path is None:
        return df.to_csv(index=False, lineterminator="\n")
    path = Path(path)
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False, lineterminator="\n")
    else:
        raise ReportError(f"-o {path}: expected a .csv or .parquet file")
    return None
