"""A reproduction document: several sweeps' tables in one Markdown file, each number beside the reference (the
authors') number, the claims it supports checked, with the commands, the machine, the wall time and the MLflow
run ids behind every cell.

    betadiff report --document docs/reproduction.yaml -o docs/reproduction.md

The document spec (YAML, typed below; unknown keys fail) names, per section, the sweeps to read: slices of one
sweep file run under their own names (``sweep run --only/--seeds --name``) are merged into one table. The output
depends only on the spec and the MLflow store: regenerating it from the same store gives the same file.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from betadiff.report.table import Ablation, ablation
from betadiff.report.tracking import (
    ReportError,
    SweepRuns,
    connect,
    load_sweep,
    metric_mode,
    resolve_tracking_uri,
)

_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


@dataclass
class ClaimSpec:
    text: str
    where: dict[str, Any] = field(default_factory=dict)  # the cell: {factor: level}
    best: bool = False  # ... or the section's best cell on the metric (a search's winner), `than` excluded
    metric: str = "jsd"
    op: str = "<="
    value: Optional[float] = None  # a threshold ...
    than: Optional[dict[str, Any]] = None  # ... or another cell's value of the same metric


@dataclass
class SectionSpec:
    title: str
    id: str = ""  # names the section's figure files (default: from the title)
    sweeps: list[str] = field(default_factory=list)
    # per sweep, the runs to take: {sweep: {key: level or [levels]}}, key a factor or a config key (a shared
    # baseline: another sweep's run of the default settings as the default row of an ablation)
    only: dict[str, dict[str, Any]] = field(default_factory=dict)
    text: str = ""  # Markdown before the table
    commands: list[str] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)
    cols: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    value: str = "last"
    last_k: int = 0  # also the mean of each run's last k logged values (evaluations) of last_k_metrics
    last_k_metrics: list[str] = field(default_factory=list)
    reference_label: str = "authors"
    reference: list[Any] = field(default_factory=list)  # [{where: {factor: level}, <metric>: value, ...}]
    claims: list[ClaimSpec] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)  # metrics whose curves are drawn
    samples: bool = False  # show each cell's sample grid (its first run's samples.png artifact)
    pruned: bool = False  # count runs the scheduler stopped, at the step they reached (a search under ASHA)
    notes: str = ""  # Markdown after the table


@dataclass
class DocumentSpec:
    title: str
    intro: str = ""
    machine: str = ""
    regenerate: str = ""  # the command that writes the document
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None
    figures_dir: str = ""  # relative to the output file; default: <output stem>/
    sections: list[SectionSpec] = field(default_factory=list)


def read_document_spec(path: str | Path) -> DocumentSpec:
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.merge(OmegaConf.structured(DocumentSpec), OmegaConf.load(path))
        spec = OmegaConf.to_object(node)
    except Exception as e:  # unknown key, wrong type, YAML syntax: one line with the file
        raise ReportError(f"{path}: {str(e).splitlines()[0]}") from e
    if not spec.sections:
        raise ReportError(f"{path}: sections: at least one section is required")
    for i, s in enumerate(spec.sections):
        where = f"{path}: sections[{i}]"
        if not s.sweeps:
            raise ReportError(f"{where}.sweeps: name at least one sweep")
        for name in s.only:
            if name not in s.sweeps:
                raise ReportError(f"{where}.only.{name}: not one of the section's sweeps ({', '.join(s.sweeps)})")
        for j, c in enumerate(s.claims):
            if c.op not in _OPS:
                raise ReportError(f"{where}.claims[{j}].op: one of {', '.join(_OPS)} (got {c.op!r})")
            if (c.value is None) == (c.than is None):
                raise ReportError(f"{where}.claims[{j}]: give either value or than")
        for j, r in enumerate(s.reference):
            if not isinstance(r, dict) or not isinstance(r.get("where"), dict):
                raise ReportError(f"{where}.reference[{j}]: expected {{where: {{factor: level}}, metric: value}}")
    return spec


def merge_runs(parts: list[SweepRuns]) -> SweepRuns:
    """One SweepRuns from slices of one design (their trial runs side by side; the first one's spec). A factor
    that a part does not vary takes its runs' config value (None for a variant name)."""
    first = parts[0]
    factors = sorted({f for p in parts for f in p.factors})
    runs = pd.concat([_with_factors(p.runs, factors) for p in parts], ignore_index=True)
    spec = replace(first.spec, seeds=None)  # slices ran different seeds: expect the most any cell has
    return replace(first, spec=spec, factors=factors, runs=runs)


def _with_factors(runs: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    add = {f: [p.get(f) for p in runs["params"]] for f in factors if f not in runs}
    return runs.assign(**add) if add else runs


def select_runs(sr: SweepRuns, only: dict[str, Any], where: str) -> SweepRuns:
    """The runs of `sr` whose value of each key (a factor, else the run's config param) is one of the given
    levels; ReportError naming `where` if no run has the key."""
    runs = sr.runs
    for key, levels in only.items():
        levels = [str(v) for v in (levels if isinstance(levels, (list, tuple)) else [levels])]
        vals = runs[key] if key in runs else runs["params"].map(lambda p, k=key: p.get(k))
        if len(runs) and vals.isna().all():
            raise ReportError(f"{where}.{key}: no run of sweep {sr.spec.name!r} has this factor or config key")
        runs = runs[vals.astype(str).isin(levels)]
    return replace(sr, runs=runs.reset_index(drop=True))


def _fmt(x: float, d: int) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def _cell_match(rec: dict, where: dict[str, Any], keys: list[str]) -> bool:
    return all(k in keys and str(rec.get(k)) == str(v) for k, v in where.items())


def _duration(ms_start, ms_end) -> float:
    if ms_start is None or ms_end is None or pd.isna(ms_start) or pd.isna(ms_end):
        return math.nan
    return (float(ms_end) - float(ms_start)) / 1000.0


def _hms(seconds: float) -> str:
    if math.isnan(seconds):
        return "—"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


class _Section:
    def __init__(self, spec: SectionSpec, parts: list[SweepRuns]):
        self.spec, self.parts = spec, parts
        self.sr = merge_runs(parts)
        self.ab: Ablation = ablation(
            self.sr,
            rows=spec.rows or None,
            cols=spec.cols if (spec.rows or spec.cols) else None,  # a section that sets rows owns the layout
            metrics=spec.metrics or None,
            value=spec.value,
            pruned=spec.pruned,
        )
        self.keys = self.ab.rows + self.ab.cols
        self.cells = self.ab.summary[[*self.keys]].drop_duplicates().to_dict("records")
        self.last_k = self._last_k() if spec.last_k else {}

    def _last_k(self) -> dict[tuple, dict[str, float]]:
        """cell -> metric -> mean over runs of each run's mean of its last k logged values."""
        h = self.sr.histories(self.spec.last_k_metrics or self.ab.metrics, list(self.ab.tidy["run_id"].unique()))
        tail = h.sort_values("step").groupby(["run_id", "metric"]).tail(self.spec.last_k)
        per_run = tail.groupby(["run_id", "metric"])["value"].mean().reset_index()
        per_run = per_run.merge(self.ab.tidy[["run_id", *self.keys]].drop_duplicates("run_id"), on="run_id")
        out: dict[tuple, dict[str, float]] = {}
        for rec in per_run.to_dict("records"):
            out.setdefault(tuple(str(rec[k]) for k in self.keys), {}).setdefault(rec["metric"], []).append(
                rec["value"]
            )
        return {c: {m: sum(v) / len(v) for m, v in d.items()} for c, d in out.items()}

    def _hit(self, where: dict[str, Any], metric: str) -> pd.DataFrame:
        s = self.ab.summary
        return s[(s["metric"] == metric) & s.apply(lambda r: _cell_match(r, where, self.keys), axis=1)]

    def value(self, where: dict[str, Any], metric: str) -> tuple[float, int]:
        hit = self._hit(where, metric)
        if len(hit) != 1 or hit["missing"].iloc[0]:
            return math.nan, 0
        return float(hit["mean"].iloc[0]), int(hit["n"].iloc[0])

    def reference(self, rec: dict) -> dict[str, float]:
        for r in self.spec.reference:
            if _cell_match(rec, r["where"], self.keys) and len(r["where"]) == len(self.keys):
                return {k: v for k, v in r.items() if k != "where"}
        return {}

    # rendering --------------------------------------------------------------------------------------------
    def markdown(self, level: int, fig_dir: Path | None, fig_rel: str) -> str:
        sp, ab = self.spec, self.ab
        out = [f"{'#' * level} {sp.title}", ""]
        if sp.text:
            out += [sp.text.strip(), ""]
        if sp.commands:
            out += ["```bash", *sp.commands, "```", ""]
        out += self._table()
        if ab.notes:
            out += ["", *[f"- {n}" for n in ab.notes]]
        if sp.claims:
            out += ["", "Claims checked against this table:", ""]
            out += [self._claim(c) for c in sp.claims]
        if sp.figures and fig_dir is not None:
            out += [""] + self._figures(fig_dir, fig_rel)
        if sp.samples and fig_dir is not None:
            out += [""] + self._samples(fig_dir, fig_rel)
        if sp.notes:
            out += ["", sp.notes.strip()]
        out += ["", *self._provenance()]
        return "\n".join(out) + "\n"

    def _table(self) -> list[str]:
        sp, ab = self.spec, self.ab
        dec = ab.decimals()
        ref_metrics = [m for m in ab.metrics if any(m in r for r in sp.reference)]
        k_metrics = (sp.last_k_metrics or ab.metrics) if sp.last_k else []
        head = [*self.keys, "n", *[f"{m} {_arrow(m)}".strip() for m in ab.metrics]]
        head += [f"{m}, last {sp.last_k}" for m in k_metrics]
        head += [f"{sp.reference_label}: {m}" for m in ref_metrics]
        head += ["runs"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        cells = {(tuple(str(r[k]) for k in self.keys), r["metric"]): r for r in ab.summary.to_dict("records")}
        for rec in self.cells:
            key = tuple(str(rec[k]) for k in self.keys)
            row = [str(rec[k]) for k in self.keys]
            first = cells[(key, ab.metrics[0])]
            row.append(str(first["n"]))
            for m in ab.metrics:
                c = cells[(key, m)]
                txt = "—" if c["missing"] else _fmt(c["mean"], dec[m])
                if not c["missing"] and c["n"] > 1:
                    txt += f" ± {_fmt(c['std'], dec[m])}"
                row.append(f"**{txt}**" if c["best"] else txt)
            lk = self.last_k.get(key, {})
            row += [_fmt(lk.get(m, math.nan), dec.get(m, 4)) for m in k_metrics]
            ref = self.reference(rec)
            row += [f"{ref[m]:g}" if m in ref else "—" for m in ref_metrics]  # as the reference states it
            row.append(", ".join(r[:8] for r in first["run_ids"]) or "—")
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", f"Mean ± std over seeds of each run's {ab.value} value; best per metric in bold; runs: the first "
                  "8 characters of their MLflow run ids (full ids below)."]
        return lines

    def _best(self, metric: str, exclude: dict[str, Any] | None) -> dict[str, Any]:
        sign = -1.0 if metric_mode(metric) == "max" else 1.0
        scored = [(sign * v, rec) for rec in self.cells
                  if not (exclude and _cell_match(rec, exclude, self.keys))
                  and not math.isnan(v := self.value(rec, metric)[0])]
        return min(scored, key=lambda t: t[0])[1] if scored else {}

    def _claim(self, c: ClaimSpec) -> str:
        where = self._best(c.metric, c.than) if c.best else c.where
        if c.best and not where:
            return f"- ? {c.text}: not measured (no finished run)"
        ours, n = self.value(where, c.metric)
        if c.than is not None:
            other, n2 = self.value(c.than, c.metric)
            target, what = other, f"{_where(c.than)} ({_fmt(other, 4)})"
        else:
            target, what, n2 = c.value, f"{c.value:g}", 1
        if math.isnan(ours) or n2 == 0 or math.isnan(target):
            return f"- ? {c.text}: not measured (no finished run)"
        mark = "✓ holds" if _OPS[c.op](ours, target) else "✗ fails"
        return f"- {mark}: {c.text} — {c.metric} of {_where(where)} = {_fmt(ours, 4)} (n={n}); needed {c.op} {what}"

    def _figures(self, fig_dir: Path, fig_rel: str) -> list[str]:
        from betadiff.report.figures import curves_figure, run_cells, save

        out = []
        cells = run_cells(self.ab.tidy, self.keys)
        hist = self.sr.histories(self.spec.figures, list(self.ab.tidy["run_id"].unique()))
        stem = self.spec.id or _slug(self.spec.title)
        for m in self.spec.figures:
            path = save(curves_figure(hist, cells, self.keys, m), fig_dir / f"{stem}_{m}.png")
            out.append(f"![{m} against training step: {self.spec.title}]({fig_rel}/{path.name})")
        return out

    def _samples(self, fig_dir: Path, fig_rel: str) -> list[str]:
        """Each cell's sample grid, copied from its first run's artifacts. Where the artifact store is out of reach
        (a clone that has the committed tracking database only), the copy made last time is kept."""
        import shutil
        import tempfile

        stem = self.spec.id or _slug(self.spec.title)
        out = []
        for rec in self.cells:
            hit = self._hit(rec, self.ab.metrics[0])
            ids = list(hit["run_ids"].iloc[0]) if len(hit) else []
            if not ids:
                continue
            target = fig_dir / f"{stem}_samples_{_slug('_'.join(str(rec[k]) for k in self.keys))}.png"
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    shutil.copyfile(self.sr.artifact(ids[0], "samples.png", tmp), target)
            except Exception:  # noqa: BLE001 -- any store error: fall back to the copy already made
                pass
            if target.exists():
                out.append(f"![samples of {_where(rec)} (run {ids[0][:8]})]({fig_rel}/{target.name})")
        return out

    def _provenance(self) -> list[str]:
        out = ["<details><summary>Sweeps, wall time and run ids</summary>", ""]
        for p in self.parts:
            parent = p.client.get_run(p.parent_run_id).info
            trials = p.runs
            busy = sum(_duration(a, b) for a, b in zip(trials["start_time"], trials["end_time"], strict=True))
            out.append(
                f"- sweep `{p.spec.name}`: parent run `{p.parent_run_id}` ({parent.status}), "
                f"{len(trials)} trial{'' if len(trials) == 1 else 's'}, "
                f"wall {_hms(_duration(parent.start_time, parent.end_time))}, "
                f"trial time {_hms(busy)}"
            )
        out.append("")
        ids_of: dict[tuple, list[str]] = {}  # a cell's runs as its first metric lists them
        for r in self.ab.summary.to_dict("records"):
            ids_of.setdefault(tuple(str(r[k]) for k in self.keys), r["run_ids"])
        for rec in self.cells:
            ids = ids_of[tuple(str(rec[k]) for k in self.keys)]
            out.append(f"- {_where(rec)}: {', '.join(f'`{i}`' for i in ids) or '—'}")
        out += ["", "</details>"]
        return out


def _arrow(m: str) -> str:
    return {"min": "↓", "max": "↑"}.get(metric_mode(m), "")


def _where(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s.lower()).strip("_")[:40].rstrip("_")


def render_document(spec: DocumentSpec, output: Path | None, tracking_uri: str | None = None) -> str:
    """The Markdown text; figures go to ``figures_dir`` beside ``output`` (none when output is None)."""
    uri = resolve_tracking_uri(tracking_uri or spec.tracking_uri)
    client = connect(uri)
    fig_dir = fig_rel = None
    if output is not None:
        fig_rel = spec.figures_dir or output.stem
        fig_dir = output.parent / fig_rel
        fig_dir.mkdir(parents=True, exist_ok=True)
    out = [f"# {spec.title}", ""]
    if spec.regenerate:
        out += ["Generated by `betadiff report`; regenerate with:", "", "```bash", spec.regenerate, "```", ""]
    if spec.intro:
        out += [spec.intro.strip(), ""]
    if spec.machine:
        out += [f"**Machine.** {spec.machine.strip()}", ""]
    shown = spec.tracking_uri or tracking_uri or uri  # as written, so the file does not depend on the cwd
    out += [f"**Tracking store.** `{_redact(shown)}`" + (f", experiment `{spec.experiment}`" if spec.experiment else ""),
            ""]
    for i, s in enumerate(spec.sections):
        parts = [
            select_runs(load_sweep(name, uri, client=client, experiment=spec.experiment), s.only.get(name, {}),
                        f"sections[{i}].only.{name}")
            for name in s.sweeps
        ]
        out.append(_Section(s, parts).markdown(2, fig_dir, fig_rel or ""))
    return "\n".join(out).rstrip() + "\n"


def _redact(uri: str) -> str:
    """No credentials in a committed document."""
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(uri)
    if u.password or u.username:
        host = u.hostname or ""
        return urlunsplit((u.scheme, f"***@{host}" + (f":{u.port}" if u.port else ""), u.path, u.query, ""))
    return uri


__all__ = [
    "DocumentSpec", "SectionSpec", "ClaimSpec", "read_document_spec", "render_document", "merge_runs", "select_runs"
]
