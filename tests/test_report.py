"""`betadiff report` / `betadiff runs` against a real MLflow store (sqlite + local artifacts).

Oracles: an independent pandas aggregation of `mlflow.search_runs` (value=last), metric histories read
straight from the MLflow client (value=best / at:STEP, curves), scipy's bootstrap (intervals).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from betadiff.report import ablation, select_values
from betadiff.report.cli import main
from betadiff.report.table import bootstrap_ci

ROOT = Path(__file__).resolve().parents[1]
FACTORS = ["tags.betadiff.factor.diffusion.loss", "tags.betadiff.factor.diffusion.eta"]


def load_test_module(name: str):
    """A sibling test file as a module (tests/ is not a package under --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(name[:-3], Path(__file__).with_name(name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return load_test_module("test_report_store.py").shared_store(tmp_path_factory)


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "betadiff.report.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=120,
    )


def _independent_last(uri: str) -> pd.DataFrame:
    """Mean/std/n of the latest w1, jsd per (loss, eta) over FINISHED trials at the modal budget 30."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    df = mlflow.search_runs(
        experiment_names=["ablate"],
        filter_string="tags.`betadiff.role` = 'trial' and attributes.status = 'FINISHED'",
    )
    df = df[df["tags.betadiff.budget"] == "30"]
    g = df.groupby(FACTORS)
    out = {}
    for m in ("w1", "jsd"):
        agg = g[f"metrics.{m}"].agg(["mean", "std", "count"])
        for (loss, eta), r in agg.iterrows():
            out[(loss, eta, m)] = (r["mean"], r["std"], int(r["count"]))
    return out


def test_cli_table_equals_independent_aggregation(store, tmp_path):
    r = _cli("report", str(store["sweep_yaml"]), "--format", "json", "-o", str(tmp_path / "t.tex"))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    expect = _independent_last(store["uri"])
    cells = {(c["diffusion.loss"], c["diffusion.eta"], c["metric"]): c for c in got["cells"]}
    assert set(cells) == {(lo, e, m) for lo in ("klub", "elbo") for e in ("1", "10") for m in ("w1", "jsd")}
    for key, (mean, std, n) in expect.items():
        c = cells[key]
        assert c["n"] == n
        assert c["mean"] == pytest.approx(mean, rel=1e-12)
        assert (c["std"] is None) if n < 2 else c["std"] == pytest.approx(std, rel=1e-12)
    # flags: (elbo, 10) only failed -> missing; (klub, 10) has 2 of 3 seeds; best by direction (min)
    assert cells[("elbo", "10", "w1")]["missing"] and cells[("elbo", "10", "w1")]["n"] == 0
    assert cells[("klub", "10", "w1")]["few_seeds"] and not cells[("klub", "1", "w1")]["few_seeds"]
    for m in ("w1", "jsd"):
        best = min((v for k, v in expect.items() if k[2] == m), key=lambda t: t[0])
        marked = [k for k, c in cells.items() if c["metric"] == m and c["best"]]
        assert len(marked) == 1 and expect[marked[0]] == best
    # the budget-60 rerun and the killed/failed runs never enter a cell
    runs = {t["run_id"]: t for t in store["trials"]}
    used = [rid for c in got["cells"] for rid in c["run_ids"]]
    assert all(runs[rid]["budget"] == 30 and runs[rid]["status"] == "FINISHED" for rid in used)
    assert any("other budgets" in n for n in got["notes"])
    tex = (tmp_path / "t.tex").read_text()
    assert r"\toprule" in tex and r"\textbf{" in tex and tex.count(r"\\") == 3  # header + 2 rows


def test_formats_are_byte_identical_and_carry_run_ids(store, tmp_path, capsys):
    """Same data -> same bytes, across processes (hash seeds differ) and within one."""
    outs = []
    for i in range(2):
        d = tmp_path / str(i)
        args = [
            "report",
            "toyabl",
            "--tracking-uri",
            store["uri"],
            "--ci",
            *(x for f in ("md", "tex", "csv", "html", "json") for x in ("-o", str(d / f"t.{f}"))),
        ]
        if i == 0:
            r = _cli(*args)
            assert r.returncode == 0, r.stderr
            stdout = r.stdout
        else:
            assert main(args) == 0
            stdout = capsys.readouterr().out
        outs.append([stdout] + [(d / f"t.{f}").read_bytes() for f in ("md", "tex", "csv", "html", "json")])
    assert outs[0] == outs[1]
    md, html = outs[0][0], outs[0][4].decode()
    assert md.encode() == outs[0][1]  # stdout defaults to md
    best_rows = [ln for ln in md.splitlines() if ln.startswith("| klub")]
    assert len(best_rows) == 1 and best_rows[0].count("**") == 4  # both metrics' best in this row
    assert "(n=2)" in md and "—" in md
    ab = ablation("toyabl", tracking_uri=store["uri"])
    for _, c in ab.summary[~ab.summary["missing"]].iterrows():
        assert f'data-run-ids="{" ".join(c["run_ids"])}"' in html
    csv = pd.read_csv(tmp_path / "0" / "t.csv")
    assert len(csv) == 8 and set(csv["metric"]) == {"w1", "jsd"}
    assert (csv["ci_lo"].dropna() <= csv["mean"].dropna()).all()


def test_value_best_and_at_step_against_histories(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store["uri"])
    for value in ("best", "at:20"):
        ab = ablation(str(store["sweep_yaml"]), value=value, metrics=["w1"])
        for _, c in ab.summary[~ab.summary["missing"]].iterrows():
            vals = []
            for rid in c["run_ids"]:
                h = client.get_metric_history(rid, "w1")
                vals.append(
                    min(x.value for x in h)
                    if value == "best"
                    else max((x for x in h if x.step <= 20), key=lambda x: x.step).value
                )
            assert c["mean"] == pytest.approx(np.mean(vals), rel=1e-12)
    last = ablation(str(store["sweep_yaml"]), metrics=["w1"]).summary
    best = ablation(str(store["sweep_yaml"]), value="best", metrics=["w1"]).summary
    assert (best["mean"].dropna() <= last["mean"].dropna()).all()
    assert (best["mean"].dropna() < last["mean"].dropna()).any()  # seed 1 ends above its best


def test_select_values_rules():
    h = pd.DataFrame(
        dict(
            run_id=["a"] * 4 + ["b"] * 2,
            metric=["w1", "w1", "w1", "cls_score", "w1", "w1"],
            step=[10, 20, 30, 10, 10, 20],
            value=[3.0, 1.0, 2.0, 5.0, 4.0, np.nan],
        )
    )
    last = select_values(h, "last").set_index(["run_id", "metric"])["value"].to_dict()
    assert last == {("a", "cls_score"): 5.0, ("a", "w1"): 2.0, ("b", "w1"): 4.0}  # NaN at b/20 skipped
    best = select_values(h, "best").set_index(["run_id", "metric"])["step"].to_dict()
    assert best[("a", "w1")] == 20
    at = select_values(h, "at:25").set_index(["run_id", "metric"])["value"].to_dict()
    assert at[("a", "w1")] == 1.0 and at[("b", "w1")] == 4.0


def test_budget_selection_and_budget_axis(store):
    ab = ablation(str(store["sweep_yaml"]), budget=60, metrics=["w1"])
    present = ab.summary[~ab.summary["missing"]]
    assert len(present) == 1 and present.iloc[0]["n"] == 1
    assert (present.iloc[0]["diffusion.loss"], present.iloc[0]["diffusion.eta"]) == ("klub", "1")
    ab = ablation(str(store["sweep_yaml"]), rows=["diffusion.loss", "train.steps"], cols=[], metrics=["w1"])
    assert set(ab.summary["train.steps"]) == {"30", "60"}
    assert not any("other budgets" in n for n in ab.notes)


def test_pruned_runs_count_at_the_step_they_reached(store):
    """A search under ASHA: pruned=True counts scheduler-stopped (KILLED, pruned) runs with their last value."""
    from mlflow.tracking import MlflowClient

    base = ablation(str(store["sweep_yaml"]), metrics=["w1"], budget=30)
    ab = ablation(str(store["sweep_yaml"]), metrics=["w1"], budget=30, pruned=True)
    (killed,) = [t for t in store["trials"] if t["status"] == "KILLED"]
    cell = lambda a: a.summary[(a.summary["diffusion.loss"] == killed["loss"])
                               & (a.summary["diffusion.eta"] == killed["eta"])].iloc[0]
    assert cell(ab)["n"] == cell(base)["n"] + 1 and killed["run_id"] in cell(ab)["run_ids"]
    (last,) = MlflowClient(tracking_uri=store["uri"]).get_metric_history(killed["run_id"], "w1")
    assert f"stopped by the scheduler at step {last.step} (run {killed['run_id'][:8]})" in " ".join(ab.notes)
    assert not any("stopped by the scheduler" in n for n in base.notes)
    # a search's cells are the points it ran: the cell whose only run failed is listed empty without pruned=True
    assert base.summary["missing"].any() and any(n.startswith("— : ") for n in base.notes)
    assert not ab.summary["missing"].any() and not any(n.startswith("— : ") for n in ab.notes)


def test_bootstrap_matches_scipy():
    from scipy.stats import bootstrap

    x = np.array([0.8, 1.1, 1.3, 0.9, 1.6, 1.2])
    lo, hi = bootstrap_ci(x, n_boot=20000)
    ref = bootstrap((x,), np.mean, n_resamples=20000, method="percentile", random_state=1).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.02) and hi == pytest.approx(ref.high, abs=0.02)
    assert math.isnan(bootstrap_ci(x[:1])[0])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["report", "nosuch"], "sweeps: toyabl"),
        (["report", "toyabl", "--experiment", "nope"], "--experiment: no experiment 'nope'"),
        (["runs", "export", "toyabl", "--metrics", "fid"], "metrics: jsd, loss, step_time_ms, w1"),
        (["report", "toyabl", "--metrics", "fid"], "metrics: jsd, loss, step_time_ms, w1"),
        (["report", "toyabl", "--rows", "data.name"], "varied: diffusion.eta, diffusion.loss, train.steps"),
        (["report", "toyabl", "--value", "median"], "--value: value must be last, best or at:STEP"),
        (["report", "toyabl", "--budget", "7"], "budgets: 30, 60"),
        (["report", "toyabl", "-o", "t.docx"], "-o t.docx: unknown suffix"),
        (["runs", "diff", "deadbeef", "cafe"], "run 'deadbeef': not found"),
    ],
)
def test_bad_input_one_line_nonzero(store, capsys, args, needle):
    assert main([*args, "--tracking-uri", store["uri"]]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_bad_sweep_file_and_store(store, tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(store["sweep_yaml"].read_text().replace("experiment: ablate", "experiment: nope"))
    assert main(["report", str(f)]) == 2
    assert "tracking.experiment: no experiment 'nope'" in capsys.readouterr().err
    f.write_text("name: toyabl\nreport: {rows: 3}\n")
    assert main(["report", str(f), "--tracking-uri", store["uri"]]) == 2
    assert f"{f}: report.rows: expected a list of strings" in capsys.readouterr().err
    assert main(["report", "toyabl", "--tracking-uri", "sqlite:///" + str(tmp_path / "none.db")]) == 2
    assert "no such sqlite file" in capsys.readouterr().err
    # the real PostgreSQL on this machine answers, but that database does not exist
    assert (
        main(
            [
                "report",
                "toyabl",
                "--tracking-uri",
                "postgresql+psycopg2://postgres@127.0.0.1:5432/betadiff_nodb",
            ]
        )
        == 2
    )
    assert 'database "betadiff_nodb" does not exist' in capsys.readouterr().err
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _cli("report", "toyabl", "--tracking-uri", f"http://127.0.0.1:{port}")
    assert r.returncode == 2 and "server unreachable" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_runs_diff_export_and_ls(store, tmp_path, capsys):
    t = store["trials"]
    a, b = (
        t[0]["run_id"],
        next(x["run_id"] for x in t if x["loss"] != t[0]["loss"] and x["eta"] == t[0]["eta"]),
    )
    assert main(["runs", "diff", a, b, "--tracking-uri", store["uri"]]) == 0
    out = capsys.readouterr().out
    assert any(ln.split()[:4] == ["p", "diffusion.loss", "klub", "elbo"] for ln in out.splitlines()), out
    assert "diffusion.eta" not in out
    assert (
        main(
            [
                "runs",
                "export",
                "toyabl",
                "--metrics",
                "w1",
                "-o",
                str(tmp_path / "c.parquet"),
                "--tracking-uri",
                store["uri"],
            ]
        )
        == 0
    )
    df = pd.read_parquet(tmp_path / "c.parquet")
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(tracking_uri=store["uri"]).get_metric_history(a, "w1")
    mine = df[df["run_id"] == a].sort_values("step")
    assert list(mine["value"]) == [h.value for h in sorted(hist, key=lambda h: h.step)]
    assert len(df["run_id"].unique()) == len(t) and set(df["metric"]) == {"w1"}
    assert main(["runs", "ls", "--tracking-uri", store["uri"]]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("toyabl"))
    assert line.split()[3:9] == ["11", "9", "1", "1", "0", "1"]


def test_figures_curves_are_seed_means(store, tmp_path, capsys):
    from betadiff.report import figures

    assert (
        main(
            [
                "report",
                str(store["sweep_yaml"]),
                "--figures",
                str(tmp_path / "fig"),
                "-q",
                "-o",
                str(tmp_path / "t.md"),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == ""
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert names == [
        "curves_jsd.pdf",
        "curves_jsd.png",
        "curves_w1.pdf",
        "curves_w1.png",
        "parallel_jsd.png",
        "parallel_w1.png",
        "samples.png",
    ]
    import matplotlib.image

    grid = matplotlib.image.imread(tmp_path / "fig" / "samples.png")
    assert grid.shape[1] > grid.shape[0] > 100  # three cells side by side
    ab = ablation(str(store["sweep_yaml"]))
    keys = ab.rows + ab.cols
    cells = figures.run_cells(ab.tidy, keys)
    fig = figures.curves_figure(ab.history, cells, keys, "w1")
    h = ab.history[ab.history["metric"] == "w1"]
    for line, ids in zip(fig.axes[0].lines, cells.values(), strict=True):
        expect = h[h["run_id"].isin(ids)].groupby("step")["value"].mean()
        assert np.allclose(line.get_ydata(), expect.to_numpy()) and list(line.get_xdata()) == list(
            expect.index
        )


def test_metric_directions_follow_core_table():
    from betadiff.report import metric_mode

    assert (
        metric_mode("cls_score") == "max" and metric_mode("w1") == "min" and metric_mode("nonsense") is None
    )
    try:
        from betadiff.train import METRIC_MODES
    except ImportError:
        pytest.skip("betadiff.train has no METRIC_MODES yet (fallback table in use)")
    assert all(metric_mode(k) == v for k, v in METRIC_MODES.items())


def test_python_api_frames(store):
    ab = ablation(str(store["sweep_yaml"]))
    finished30 = [t["run_id"] for t in store["trials"] if t["status"] == "FINISHED" and t["budget"] == 30]
    assert sorted(ab.tidy["run_id"].unique()) == sorted(finished30) and len(ab.tidy) == 2 * len(finished30)
    for _, c in ab.summary.iterrows():
        got = ab.table.loc[c["diffusion.loss"], ("mean", c["metric"], c["diffusion.eta"])]
        assert (math.isnan(got) and c["missing"]) or got == c["mean"]
