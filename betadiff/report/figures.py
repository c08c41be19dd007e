"""Sweep figures (matplotlib, Agg): metric-vs-step curves grouped by cell with seed bands, parallel
coordinates of factors against a metric, and the runs' sample artifacts side by side.

Each ``*_figure`` function takes frames and returns a Figure; ``write_figures`` saves the paper-style set.
The per-run sample figures themselves (PMF vs truth, image grids) come from ``betadiff.plots`` via the
trainer's ``samples.png`` artifact; here they are only laid out next to each other.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from betadiff.report.tracking import metric_mode, sort_levels

# Figures are built with the object API, never pyplot: no display needed, and the dashboard renders
# several figures at once in worker threads, which pyplot's global state does not allow.

_SAVE = dict(dpi=120, bbox_inches="tight")
# Fixed metadata so that the same data gives byte-identical files.
_META = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None}, "svg": {"Date": None}}


def cell_label(keys: list[str], values: tuple) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, values, strict=True)) or "all"


def run_cells(tidy: pd.DataFrame, keys: list[str]) -> dict[tuple, list[str]]:
    """cell (tuple of level strings, grid order) -> sorted run ids, from an Ablation.tidy frame."""
    runs = tidy.drop_duplicates("run_id")
    order = [sort_levels(runs[k]) for k in keys]
    cells: dict[tuple, list[str]] = {}
    for key, g in runs.groupby(keys, sort=False) if keys else [((), runs)]:
        cells[key if isinstance(key, tuple) else (key,)] = sorted(g["run_id"])
    return dict(sorted(cells.items(), key=lambda kv: [o.index(v) for o, v in zip(order, kv[0], strict=True)]))


def curves_figure(
    history: pd.DataFrame, cells: dict[tuple, list[str]], keys: list[str], metric: str, ax=None
):
    """``metric`` against step: one line per cell (mean over its runs) and a band of ± 1 std over seeds.

    history: long frame (run_id, metric, step, value). Returns the Figure.
    """
    ax = ax if ax is not None else Figure(figsize=(6, 3.6)).subplots()
    fig = ax.figure
    h = history[history["metric"] == metric]
    colors = matplotlib.colormaps["tab10"]
    for i, (cell, ids) in enumerate(cells.items()):
        wide = h[h["run_id"].isin(ids)].pivot(index="step", columns="run_id", values="value").sort_index()
        if wide.empty:
            continue
        mean, std = wide.mean(axis=1), wide.std(axis=1, ddof=1).fillna(0.0)
        c = colors(i % 10)
        ax.plot(wide.index, mean, color=c, lw=1.6, label=f"{cell_label(keys, cell)} (n={wide.shape[1]})")
        ax.fill_between(wide.index, mean - std, mean + std, color=c, alpha=0.2, lw=0)
    arrow = {"min": " (lower is better)", "max": " (higher is better)"}.get(metric_mode(metric), "")
    ax.set(xlabel="step", ylabel=metric, title=f"{metric}{arrow}")
    if (h["value"] > 0).all() and len(h) and h["value"].max() / max(h["value"].min(), 1e-300) > 50:
        ax.set_yscale("log")  # metrics spanning decades (early vs late training) read better on log axes
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    return fig


def parallel_coordinates_figure(tidy: pd.DataFrame, factors: list[str], metric: str):
    """One polyline per run through its factor levels and its ``metric`` value, coloured by the metric
    (bright = better). Factor axes place the sorted levels evenly; the metric axis is linear."""
    d = tidy[tidy["metric"] == metric].sort_values("run_id")
    fig = Figure(figsize=(1.6 * (len(factors) + 1) + 1.5, 3.6))
    ax = fig.subplots()
    if d.empty:
        ax.set_axis_off()
        return fig
    axes_y, ticks = [], []
    for f in factors:
        levels = sort_levels(d[f].astype(str))
        pos = {lv: (i / (len(levels) - 1) if len(levels) > 1 else 0.5) for i, lv in enumerate(levels)}
        axes_y.append(d[f].astype(str).map(pos).to_numpy(float))
        ticks.append([(pos[lv], lv) for lv in levels])
    v = d["value"].to_numpy(float)
    lo, hi = np.nanmin(v), np.nanmax(v)
    span = hi - lo if hi > lo else 1.0
    axes_y.append((v - lo) / span)
    ticks.append([(0.0, f"{lo:.3g}"), (1.0, f"{hi:.3g}")])
    y = np.stack(axes_y, axis=1)  # (runs, axes)
    # bright = better: reverse the colour map for metrics to minimise
    cmap = matplotlib.colormaps["viridis_r" if metric_mode(metric) != "max" else "viridis"]
    norm = Normalize(lo, hi if hi > lo else lo + 1.0)
    x = np.arange(y.shape[1])
    for row, val in zip(y, v, strict=True):
        ax.plot(x, row, color=cmap(norm(val)), alpha=0.8, lw=1.4)
    for i, tk in enumerate(ticks):
        ax.axvline(i, color="0.3", lw=0.8)
        for pos, lab in tk:
            ax.text(i + 0.03, pos, str(lab), fontsize=7, va="center")
    ax.set_xticks(x, [*(f.rsplit(".", 1)[-1] for f in factors), metric], fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.08, 1.08)
    for s in ("left", "right", "top"):
        ax.spines[s].set_visible(False)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.04, pad=0.02, label=metric)
    ax.set_title(f"{metric} against the factors ({len(d)} runs)", fontsize=9)
    return fig


def sample_grid_figure(images: list[tuple[str, np.ndarray]], ncols: int = 4):
    """Images (title, HxW[xC] array) side by side, ``ncols`` per row."""
    n = max(1, len(images))
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.8 * nrows))
    axs = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axs.ravel():
        ax.set_axis_off()
    for ax, (title, img) in zip(axs.ravel(), images, strict=False):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def save(fig, path: Path) -> Path:
    """Save with fixed metadata (format from the suffix)."""
    path = Path(path)
    fig.savefig(path, metadata=_META.get(path.suffix[1:], {}), **_SAVE)
    return path


def to_png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata=_META["png"], **_SAVE)
    return buf.getvalue()


def sample_images(
    sweep_runs, cells: dict[tuple, list[str]], keys: list[str], cache: Path, artifact: str = "samples.png"
) -> list[tuple[str, np.ndarray, str]]:
    """(label, image, run_id) for the first run of each cell that has the artifact (downloaded to cache)."""
    out = []
    for cell, ids in cells.items():
        for rid in ids:
            try:
                local = sweep_runs.artifact(rid, artifact, Path(cache) / rid)
            except Exception:  # run without samples (e.g. failed before its first evaluation)
                continue
            out.append((cell_label(keys, cell), matplotlib.image.imread(local), rid))
            break
    return out


def write_figures(ab, sweep_runs, out_dir: str | Path) -> list[Path]:
    """The paper-style set for an :class:`~betadiff.report.table.Ablation`: ``curves_<metric>.{pdf,png}``,
    ``parallel_<metric>.png`` and ``samples.png`` (one sample artifact per cell)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = ab.rows + ab.cols
    cells = run_cells(ab.tidy, keys)
    written = []
    for m in ab.metrics:
        for ext in ("pdf", "png"):
            written.append(save(curves_figure(ab.history, cells, keys, m), out / f"curves_{m}.{ext}"))
        factors = [f for f in sweep_runs.factors if ab.tidy[f].nunique() > 1] if len(ab.tidy) else []
        written.append(save(parallel_coordinates_figure(ab.tidy, factors, m), out / f"parallel_{m}.png"))
    with tempfile.TemporaryDirectory() as tmp:
        imgs = sample_images(sweep_runs, cells, keys, Path(tmp))
    if imgs:
        written.append(save(sample_grid_figure([(lab, im) for lab, im, _ in imgs]), out / "samples.png"))
    return written


__all__ = [
    "curves_figure",
    "parallel_coordinates_figure",
    "sample_grid_figure",
    "write_figures",
    "sample_images",
    "run_cells",
    "save",
    "to_png_bytes",
]
