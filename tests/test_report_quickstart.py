"""Acceptance: a real (tiny) quickstart sweep -> `betadiff report` prints the Markdown table and writes the
LaTeX one; the numbers equal an independent pandas aggregation of `mlflow.search_runs`; the dashboard shows
the same table and a sample grid in headless Chromium.

The sweep is sweeps/quickstart.yaml with a laptop-test budget (20 steps, 2 losses × 2 seeds), run with
`betadiff sweep run` (local Ray, MLflow in a sqlite file) in the test's tmp dir.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "sweeps" / "quickstart.yaml"
METRICS = ["w1", "jsd", "hellinger"]

pytestmark = pytest.mark.skipif(
    not (ROOT / "betadiff" / "sweep" / "cli.py").is_file() or not QUICKSTART.is_file(),
    reason="the sweep layer (betadiff/sweep/cli.py, sweeps/quickstart.yaml) is absent",
)


def _betadiff(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("BETADIFF_TRACKING_URI", "MLFLOW_TRACKING_URI")}
    return subprocess.run(
        [sys.executable, "-m", "betadiff.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from omegaconf import OmegaConf

    tmp = tmp_path_factory.mktemp("quickstart")
    spec = OmegaConf.load(QUICKSTART)
    spec.name = "qs_tiny"
    spec.overrides.update(
        {
            "train.steps": 20,
            "train.batch_size": 128,
            "train.eval_every": 10,
            "train.ckpt_every": 10,
            "train.log_every": 5,
            "optim.warmup_steps": 0,
            "eval.n_samples": 2000,
            "eval.steps": 10,
        }
    )
    spec.factors.axes = {"diffusion.loss": ["klub", "elbo"]}
    spec.seeds = [0, 1]
    spec.base = (
        str((QUICKSTART.parent / spec.base).resolve())
        if (QUICKSTART.parent / spec.base).is_file()
        else spec.base
    )
    OmegaConf.save(spec, tmp / "qs_tiny.yaml")
    r = _betadiff("sweep", "run", "qs_tiny.yaml", cwd=tmp)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return dict(
        dir=tmp,
        file=tmp / "qs_tiny.yaml",
        uri=f"sqlite:///{tmp / 'mlflow.db'}",
        experiment=spec.tracking.experiment,
    )


def _independent(uri: str, experiment: str) -> dict:
    """(loss, metric) -> (mean, std, n) over the sweep's FINISHED trial runs, from mlflow.search_runs."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    df = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=(
            "tags.`betadiff.sweep` = 'qs_tiny' and tags.`betadiff.role` = 'trial' "
            "and attributes.status = 'FINISHED'"
        ),
    )
    assert len(df) == 4 and df["tags.betadiff.budget"].nunique() == 1
    out = {}
    for loss, g in df.groupby("params.diffusion.loss"):
        assert sorted(g["tags.betadiff.seed"]) == ["0", "1"]
        for m in METRICS:
            out[(loss, m)] = (g[f"metrics.{m}"].mean(), g[f"metrics.{m}"].std(), len(g))
    return out


def _check_cell(text: str, mean: float, std: float) -> None:
    """'0.324 ± 0.020' shows mean and std rounded to the printed number of decimals."""
    shown_mean, shown_std = text.split(" ± ")
    tol = 0.5 * 10 ** -len(shown_mean.split(".")[1]) + 1e-12
    assert abs(float(shown_mean) - mean) <= tol and abs(float(shown_std) - std) <= tol, (text, mean, std)


def test_report_equals_independent_aggregation(sweep, capsys):
    tex = sweep["dir"] / "ablation.tex"
    r = _betadiff("report", "qs_tiny.yaml", "-o", str(tex), cwd=sweep["dir"])
    assert r.returncode == 0, r.stderr
    md = r.stdout
    expect = _independent(sweep["uri"], sweep["experiment"])
    rows = {
        ln.split("|")[1].strip(): [c.strip().strip("*") for c in ln.split("|")[2:-1]]
        for ln in md.splitlines()
        if ln.startswith("| klub") or ln.startswith("| elbo")
    }
    assert set(rows) == {"klub", "elbo"} and "| diffusion.loss | w1 ↓ | jsd ↓ | hellinger ↓ |" in md
    for (loss, m), (mean, std, _) in expect.items():
        _check_cell(rows[loss][METRICS.index(m)], mean, std)
    for m in METRICS:  # bold where the independent mean is lowest (all three are "min" metrics)
        best = min(("klub", "elbo"), key=lambda lo: expect[(lo, m)][0])
        assert f"**{rows[best][METRICS.index(m)]}**" in md
    text = tex.read_text()
    assert r"\toprule" in text and text.count(r"\textbf{") == 3
    from betadiff.report.cli import main

    assert main(["report", "qs_tiny", "--tracking-uri", sweep["uri"], "--format", "json"]) == 0  # by name
    cells = {(c["diffusion.loss"], c["metric"]): c for c in json.loads(capsys.readouterr().out)["cells"]}
    for key, (mean, std, n) in expect.items():
        assert cells[key]["mean"] == pytest.approx(mean, rel=1e-12)
        assert cells[key]["std"] == pytest.approx(std, rel=1e-12) and cells[key]["n"] == n


@pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists(), reason="/usr/bin/chromium absent (apt-get install chromium)"
)
def test_dashboard_shows_table_and_samples_in_chromium(sweep, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "test_dashboard", Path(__file__).with_name("test_dashboard.py")
    )
    dash = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dash)
    dom, shot = dash.render_in_chromium(sweep["uri"], "/sweeps/qs_tiny", tmp_path)
    expect = _independent(sweep["uri"], sweep["experiment"])
    table = re.search(r'<table class="ablation".*?</table>', dom, re.S).group(0)
    for (loss, m), (mean, std, _) in expect.items():
        row = re.search(rf"<tr><th>{loss}</th>(.*?)</tr>", table, re.S).group(1)
        cell = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)[METRICS.index(m)]
        _check_cell(re.sub(r"<[^>]+>", "", cell), mean, std)
    assert dash.images_loaded(dom) >= 2 * len(METRICS) + 2 and dom.count('class="sample" ') == 2
    dash.assert_rendered(shot)
