"""Ablation tables: tracked trial runs -> mean ± std over seeds per cell -> md / tex / csv / html / json.

Pipeline (each step a function of frames, so the same MLflow data gives byte-identical output):
``select_values`` picks one number per (run, metric) from its per-step history (last | best | at:STEP);
``aggregate`` groups runs into the cells of the rows × cols grid (every combination of the levels the sweep
used, so a cell with no finished run shows up as missing), computes mean, std (ddof=1), n and an optional
95 % bootstrap interval, and marks the best cell per metric by the metric's direction.
"""

from __future__ import annotations

import html
import io
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from betadiff.report.tracking import (
    BUDGET_KEY,
    ReportError,
    SweepRuns,
    json_dumps,
    load_sweep,
    metric_mode,
    parse_value,
    sort_levels,
)

FORMATS = ("md", "tex", "csv", "html", "json")
_ARROW = {"min": "↓", "max": "↑", None: ""}
_TEX_ARROW = {"min": r"$\downarrow$", "max": r"$\uparrow$", None: ""}


def select_values(hist: pd.DataFrame, value: str) -> pd.DataFrame:
    """One value per (run_id, metric) from a long history frame (run_id, metric, step, value).

    value: "last" (largest step), "best" (min or max over steps by the metric's mode), "at:STEP" (the last
    value logged at a step <= STEP, as the sweep layer's own table reads it). Returns run_id, metric, step,
    value.
    """
    kind, at = parse_value(value)
    h = hist.dropna(subset=["value"])
    if kind in ("last", "at"):
        h = h[h["step"] <= at] if kind == "at" else h
        out = h.sort_values("step", kind="stable").groupby(["run_id", "metric"], sort=True).tail(1)
    else:
        parts = []
        for m, g in h.groupby("metric", sort=True):
            mode = metric_mode(m)
            if mode is None:
                raise ReportError(f"--value best: metric {m!r} has no known direction (min/max)")
            # ties -> earliest step, so the choice does not depend on row order
            g = g.sort_values(
                ["run_id", "value", "step"], ascending=[True, mode == "min", True], kind="stable"
            )
            parts.append(g.groupby("run_id", sort=True).head(1))
        out = pd.concat(parts) if parts else h.iloc[:0]
    return out.sort_values(["run_id", "metric"], kind="stable").reset_index(drop=True)


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean; NaN for fewer than 2 values.

    A fresh generator per call keeps every cell's interval independent of the order cells are computed in.
    """
    if len(values) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n_boot, len(values)), replace=True).mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def _decimals(means: pd.Series) -> int:
    """Decimals giving three significant digits to the smallest nonzero |mean| of a metric (0..6)."""
    m = means.abs()
    m = m[np.isfinite(m) & (m > 0)]
    if m.empty:
        return 3
    return int(min(6, max(0, 2 - math.floor(math.log10(m.min())))))


@dataclass
class Ablation:
    """An ablation table. ``tidy``: one row per (run, metric) with the selected value; ``summary``: one row
    per (cell, metric) with mean, std, n, n_expected, ci_lo, ci_hi, best, missing, few_seeds, run_ids;
    ``history``: the per-step values of those runs; ``table``: the pivot (index = rows,
    columns = (stat, metric, *cols))."""

    name: str
    rows: list[str]
    cols: list[str]
    metrics: list[str]
    value: str
    tidy: pd.DataFrame
    summary: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    ci: bool = False
    history: pd.DataFrame | None = (
        None  # per-step curves of the runs in the table (run_id, metric, step, value)
    )

    @property
    def table(self) -> pd.DataFrame:
        s = self.summary
        index = self.rows or ["_all"]
        if not self.rows:
            s = s.assign(_all="all")
        t = s.set_index([*index, "metric", *self.cols])[["mean", "std", "n"]]
        return t.unstack(["metric", *self.cols]).sort_index(axis=1)

    def decimals(self) -> dict[str, int]:
        return {m: _decimals(g["mean"]) for m, g in self.summary.groupby("metric", sort=False)}

    def render(self, fmt: str, run_url: Callable[[str], str] | None = None) -> str:
        if fmt not in FORMATS:
            raise ReportError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        return _RENDERERS[fmt](self, run_url) if fmt == "html" else _RENDERERS[fmt](self)

    # grid helpers shared by the renderers -----------------------------------------------------------------
    def _keys(self, keys: list[str]) -> list[tuple]:
        return list(dict.fromkeys(tuple(r[k] for k in keys) for r in self.summary.to_dict("records")))

    def _row_keys(self) -> list[tuple]:
        return self._keys(self.rows)

    def _col_keys(self) -> list[tuple[str, tuple]]:
        return [(m, c) for m in self.metrics for c in self._keys(self.cols)]

    def _cells(self) -> dict[tuple, dict]:
        out = {}
        for r in self.summary.to_dict("records"):
            out[(tuple(r[k] for k in self.rows), r["metric"], tuple(r[k] for k in self.cols))] = r
        return out

    def _cell_text(self, r: dict, d: int) -> str:
        if r["missing"]:
            return "—"
        txt = f"{r['mean']:.{d}f}"
        if r["n"] > 1:
            txt += f" ± {r['std']:.{d}f}"
        if self.ci and r["n"] > 1:
            txt += f" [{r['ci_lo']:.{d}f}, {r['ci_hi']:.{d}f}]"
        if r["few_seeds"]:
            txt += f" (n={r['n']})"
        return txt

    def _col_label(self, metric: str, col: tuple, arrow: dict, esc: Callable[[str], str] = str) -> str:
        label = f"{esc(metric)} {arrow[metric_mode(metric)]}".strip()
        if self.cols:
            label += " · " + esc(", ".join(f"{k}={v}" for k, v in zip(self.cols, col, strict=True)))
        return label

    def caption(self) -> str:
        stat = "mean ± std over seeds" + (", [95 % bootstrap CI]" if self.ci else "")
        return f"Sweep {self.name}: value = {self.value}; {stat}; best per metric in bold."


# ---------------------------------------------------------------------------------------------------------


def aggregate(
    tidy: pd.DataFrame,
    levels: dict[str, list[str]],
    metrics: list[str],
    n_expected: int | None,
    ci: bool = False,
) -> pd.DataFrame:
    """Summary per (cell, metric) over the full grid of ``levels`` (key -> ordered level strings).

    tidy: run_id, metric, value, and one column per key in ``levels``. n_expected None -> the largest n.
    """
    keys = list(levels)
    grid = list(itertools.product(*levels.values())) if keys else [()]
    groups = (
        {k if isinstance(k, tuple) else (k,): g for k, g in tidy.groupby([*keys, "metric"], sort=False)}
        if len(tidy)
        else {}
    )
    recs = []
    for metric in metrics:
        for cell in grid:
            g = groups.get((*cell, metric))
            vals = g.sort_values("run_id")["value"].to_numpy(float) if g is not None else np.empty(0)
            ids = sorted(g["run_id"]) if g is not None else []
            n = len(vals)
            lo, hi = bootstrap_ci(vals) if ci else (math.nan, math.nan)
            recs.append(
                {
                    **dict(zip(keys, cell, strict=True)),
                    "metric": metric,
                    "mean": float(vals.mean()) if n else math.nan,
                    "std": float(vals.std(ddof=1)) if n > 1 else math.nan,
                    "n": n,
                    "ci_lo": lo,
                    "ci_hi": hi,
                    "run_ids": ids,
                }
            )
    s = pd.DataFrame(recs, columns=[*keys, "metric", "mean", "std", "n", "ci_lo", "ci_hi", "run_ids"])
    n_exp = n_expected if n_expected is not None else (int(s["n"].max()) if len(s) else 0)
    s["n_expected"] = n_exp
    s["missing"] = s["n"] == 0
    s["few_seeds"] = (s["n"] > 0) & (s["n"] < n_exp)
    s["mode"] = [metric_mode(m) for m in s["metric"]]
    s["best"] = False
    for metric, g in s[~s["missing"]].groupby("metric", sort=False):
        mode = metric_mode(metric)
        if mode is not None:
            target = g["mean"].min() if mode == "min" else g["mean"].max()
            s.loc[g.index[g["mean"] == target], "best"] = True
    return s


def ablation(
    sweep: str | SweepRuns,
    *,
    rows: list[str] | None = None,
    cols: list[str] | None = None,
    metrics: list[str] | None = None,
    value: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    ci: bool = False,
    budget: int | None = None,
    pruned: bool = False,
) -> Ablation:
    """Build the ablation table of a sweep (YAML path, sweep name, or loaded :class:`SweepRuns`).

    rows/cols/metrics/value default to the sweep file's ``report`` section; rows default to every varied
    factor. Only FINISHED runs count; runs at a budget other than the table's are left out with a note
    (unless train.steps is itself a row/col key), so different budgets are never silently compared.
    pruned=True also counts runs the scheduler stopped (a search under ASHA): their value is from the step they
    reached, which a note names.
    """
    sr = sweep if isinstance(sweep, SweepRuns) else load_sweep(sweep, tracking_uri, experiment=experiment)
    spec = sr.spec
    src = spec.source or spec.name
    rows_src = "--rows" if rows else f"{src}: report.rows"
    cols_src = "--cols" if cols else f"{src}: report.cols"
    rows = list(rows or spec.rows)
    cols = list(cols if cols is not None else spec.cols)  # [] means: no columns
    if cols and not rows and not spec.rows:
        rows = [f for f in sr.factors if f not in cols]
    elif not rows and not cols:
        rows = list(sr.factors)
    value = value or spec.value
    parse_value(value, "--value")
    runs = sr.runs
    varied = list(sr.factors)
    if runs["budget"].nunique() > 1 and BUDGET_KEY not in varied:
        runs = runs.assign(**{BUDGET_KEY: runs["budget"]})
        varied.append(BUDGET_KEY)
    for where, keys in ((rows_src, rows), (cols_src, cols)):
        bad = [k for k in keys if k not in varied]
        if bad:
            raise ReportError(
                f"{where}: {', '.join(map(repr, bad))} not varied by sweep {sr.spec.name!r}; "
                f"varied: {', '.join(varied) or '(none)'}"
            )
    if set(rows) & set(cols) or len(set(rows)) < len(rows) or len(set(cols)) < len(cols):
        raise ReportError(f"rows {rows} and cols {cols} must be distinct keys")
    available = sr.available_metrics()
    metrics = list(metrics or spec.metrics) or [m for m in available if metric_mode(m) is not None]
    bad = [m for m in metrics if m not in available]
    if bad or not metrics:
        raise ReportError(
            f"metric {', '.join(map(repr, bad)) or '(none given)'}: no run of sweep "
            f"{sr.spec.name!r} logged it; metrics: {', '.join(available) or '(none)'}"
        )

    notes = []
    counted = (runs["status"] == "FINISHED") | ((runs["status"] == "KILLED") & runs["pruned"].astype(bool) & pruned)
    done, left = runs[counted], runs[~counted]
    if len(left):
        what = ", ".join(f"{n} {s.lower()}" for s, n in sorted(left["status"].value_counts().items()))
        n_pruned = int(left["pruned"].sum())
        notes.append(
            f"Left out {_runs(len(left))} not FINISHED ({what}{f'; {n_pruned} pruned' if n_pruned else ''})."
        )
    keys = rows + cols
    if BUDGET_KEY not in keys and len(done):
        done = _one_budget(done, budget, notes)

    hist = sr.histories(metrics, list(done["run_id"]))
    picked = select_values(hist, value)
    tidy = picked.merge(
        done[["run_id", "seed", "budget", *[k for k in varied if k in done]]], on="run_id", how="left"
    )
    tidy = tidy[["run_id", "seed", "budget", *[k for k in varied if k in done], "metric", "step", "value"]]
    if pruned:
        stops = tidy[tidy["run_id"].isin(done[done["pruned"].astype(bool)]["run_id"])]
        for rid, g in stops.groupby("run_id", sort=False):
            where = ", ".join(f"{k}={g[k].iloc[0]}" for k in keys if k in g)
            notes.append(f"{where}: stopped by the scheduler at step {int(g['step'].max())} (run {rid[:8]}).")
    lacking = len(done) * len(metrics) - len(picked)
    if lacking:
        notes.append(f"{lacking} (run, metric) pairs have no value for value={value}.")
    levels = {k: sort_levels(runs[k].dropna()) for k in keys}
    # train.steps is never pooled: off the keys, the budget filter above already fixed it
    pooled = [f for f in varied if f not in keys and f != BUDGET_KEY and runs[f].nunique() > 1]
    if pooled:
        notes.append(f"Pooled over factors not in rows/cols: {', '.join(pooled)}.")
    n_expected = None
    if spec.seeds is not None:
        n_expected = len(spec.seeds) * math.prod(runs[f].nunique() for f in pooled)
    summary = aggregate(tidy, levels, metrics, n_expected, ci=ci)
    if pruned and keys:  # a search: its cells are the points it ran, not the product of every level of every key
        summary = summary[summary.groupby(keys, sort=False)["n"].transform("max") > 0]
    if summary["missing"].any():
        notes.append(f"— : no finished run in {int(summary['missing'].sum())} (cell, metric) entries.")
    if summary["few_seeds"].any():
        notes.append(f"(n=k): fewer seeds than the {summary['n_expected'].iloc[0]} expected.")
    unknown = [m for m in metrics if metric_mode(m) is None]
    if unknown:
        notes.append(f"No best marked for {', '.join(unknown)} (direction unknown).")
    return Ablation(
        name=spec.name,
        rows=rows,
        cols=cols,
        metrics=metrics,
        value=value,
        tidy=tidy,
        summary=summary,
        notes=notes,
        ci=ci,
        history=hist,
    )


def _one_budget(done: pd.DataFrame, budget: int | None, notes: list[str]) -> pd.DataFrame:
    """The finished runs at one budget: ``budget`` if given, else the one most runs reached (ties -> the
    largest); the others are left out with a note rather than compared with them."""
    budgets = done["budget"].fillna("?")
    counts = budgets.value_counts()
    if budget is not None:
        if str(budget) not in counts.index:
            raise ReportError(
                f"--budget {budget}: no finished run at that budget; budgets: "
                f"{', '.join(sort_levels(counts.index))}"
            )
        main = str(budget)
    else:
        main = max(counts.index, key=lambda b: (counts[b], _num(b)))
    other = done[budgets != main]
    if len(other):
        notes.append(
            f"Left out {_runs(len(other))} at other budgets "
            f"({', '.join(sort_levels(other['budget'].fillna('?')))} steps; table at {main}); "
            f"show them with --budget or by adding {BUDGET_KEY} to rows/cols."
        )
    return done[budgets == main]


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _num(s: str) -> float:
    try:
        return float(s)
    except (TypeError, ValueError):
        return -math.inf


# ---------------------------------------------------------------------------------------------------------
# Renderers: each walks the same grid (row keys × (metric, col key)) in the same order.


def _grid(a: Ablation):
    cells, dec = a._cells(), a.decimals()
    cols = a._col_keys()
    for row in a._row_keys():
        yield row, [(m, c, cells[(row, m, c)], dec[m]) for m, c in cols]


def _md_escape(s: str) -> str:
    return str(s).replace("|", r"\|")


def render_md(a: Ablation) -> str:
    head = [*(a.rows or [""]), *(a._col_label(m, c, _ARROW) for m, c in a._col_keys())]
    lines = [
        f"**{a.caption()}**",
        "",
        "| " + " | ".join(map(_md_escape, head)) + " |",
        "|" + "|".join([":--"] * len(a.rows or [""]) + ["--:"] * (len(head) - len(a.rows or [""]))) + "|",
    ]
    for row, cells in _grid(a):
        vals = [f"**{a._cell_text(r, d)}**" if r["best"] else a._cell_text(r, d) for _, _, r, d in cells]
        lines.append("| " + " | ".join(map(_md_escape, [*(row or ("all",)), *vals])) + " |")
    lines += [""] + [f"- {n}" for n in a.notes]
    return "\n".join(lines).rstrip() + "\n"


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _tex_escape(s: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(s))


def render_tex(a: Ablation) -> str:
    nr = len(a.rows or [""])
    head = [
        *map(_tex_escape, a.rows or [""]),
        *(a._col_label(m, c, _TEX_ARROW, _tex_escape) for m, c in a._col_keys()),
    ]
    lines = [
        f"% {a.caption()}",
        r"\begin{tabular}{" + "l" * nr + "r" * (len(head) - nr) + "}",
        r"\toprule",
        " & ".join(head) + r" \\",
        r"\midrule",
    ]
    for row, cells in _grid(a):
        vals = []
        for _, _, r, d in cells:
            t = _tex_escape(a._cell_text(r, d)).replace("±", r"$\pm$").replace("—", "--")
            vals.append(rf"\textbf{{{t}}}" if r["best"] else t)
        lines.append(" & ".join([*map(_tex_escape, row or ("all",)), *vals]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"] + [f"% {n}" for n in a.notes]
    return "\n".join(lines) + "\n"


def _export_frame(a: Ablation) -> pd.DataFrame:
    s = a.summary.copy()
    s["run_ids"] = [" ".join(r) for r in s["run_ids"]]
    return s[
        [
            *a.rows,
            *a.cols,
            "metric",
            "mode",
            "mean",
            "std",
            "n",
            "n_expected",
            "ci_lo",
            "ci_hi",
            "best",
            "missing",
            "few_seeds",
            "run_ids",
        ]
    ]


def render_csv(a: Ablation) -> str:
    buf = io.StringIO()
    _export_frame(a).to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def render_json(a: Ablation) -> str:
    cells = a.summary.to_dict("records")
    for c in cells:
        c["n"], c["n_expected"] = int(c["n"]), int(c["n_expected"])
        c["best"], c["missing"], c["few_seeds"] = bool(c["best"]), bool(c["missing"]), bool(c["few_seeds"])
    return json_dumps(
        dict(
            sweep=a.name,
            value=a.value,
            rows=a.rows,
            cols=a.cols,
            metrics=a.metrics,
            modes={m: metric_mode(m) for m in a.metrics},
            cells=cells,
            notes=a.notes,
        )
    )


def render_html(a: Ablation, run_url: Callable[[str], str] | None = None) -> str:
    """A self-contained <table> (plus caption and notes); each cell carries data-run-ids."""
    e = html.escape
    head = "".join(f"<th>{e(k)}</th>" for k in a.rows or [""])
    for m, c in a._col_keys():
        head += (
            f'<th data-metric="{e(m)}" data-mode="{e(str(metric_mode(m)))}">'
            f"{e(a._col_label(m, c, _ARROW))}</th>"
        )
    body = []
    for row, cells in _grid(a):
        tds = "".join(f"<th>{e(str(v))}</th>" for v in row or ("all",))
        for m, _, r, d in cells:
            cls = " ".join(
                x for x, on in (("best", r["best"]), ("missing", r["missing"]), ("few", r["few_seeds"])) if on
            )
            text = e(a._cell_text(r, d))
            text = f"<strong>{text}</strong>" if r["best"] else text
            if run_url and r["run_ids"]:
                text += (
                    '<span class="runs">'
                    + " ".join(
                        f'<a href="{e(run_url(rid))}" title="{e(rid)}">{i + 1}</a>'
                        for i, rid in enumerate(r["run_ids"])
                    )
                    + "</span>"
                )
            tds += (
                f'<td class="{cls}" data-metric="{e(m)}" data-n="{r["n"]}" '
                f'data-run-ids="{e(" ".join(r["run_ids"]))}">{text}</td>'
            )
        body.append(f"<tr>{tds}</tr>")
    notes = "".join(f"<li>{e(n)}</li>" for n in a.notes)
    return (
        f'<table class="ablation" data-sweep="{e(a.name)}" data-value="{e(a.value)}">\n'
        f"<caption>{e(a.caption())}</caption>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + f'\n</tbody>\n</table>\n<ul class="notes">{notes}</ul>\n'
    )


_RENDERERS = {"md": render_md, "tex": render_tex, "csv": render_csv, "json": render_json, "html": render_html}
