"""The paper's sweeps (sweeps/paper/): every file validates at full and smoke size, and the Fashion-MNIST
comparison (variant levels that switch beta <-> Gaussian) runs end to end at smoke size through a real local Ray,
a real SQLite MLflow store and `betadiff report`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from betadiff.sweep.schema import SweepError, load_sweep

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "sweeps" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_sweep_validates(path):
    full, smoke = load_sweep(path), load_sweep(path, smoke=True)
    assert smoke.name == f"{full.name}_smoke" and len(smoke.seeds) == 1
    assert len(smoke.trials) <= len(full.trials)
    for t in full.trials:  # every trial is a valid trainer config
        cfg = full.trial_config(t.factors, t.seed)
        assert cfg.train.seed == t.seed


def test_the_six_methods_and_ablations_are_covered():
    by_name = {load_sweep(p).name: load_sweep(p) for p in PAPER}
    tm = by_name["paper_toy_methods"]
    losses = {(c.diffusion.kind, c.diffusion.loss, c.data.name)
              for c in (tm.trial_config(t.factors, t.seed) for t in tm.trials)}
    six = {("beta", "klub"), ("beta", "elbo"), ("beta", "klub_cond"), ("beta", "klub_marg"),
           ("gaussian", "eps_mse"), ("gaussian", "gauss_klub")}
    assert losses == {(*m, d) for m in six for d in ("toy1", "toy2")} and tm.seeds == [0, 1, 2]
    assert {t.factors["diffusion.eta"] for t in by_name["paper_toy1_eta"].trials} == {1e2, 1e3, 1e4, 1e5}
    assert {t.factors["eval.steps"] for t in by_name["paper_toy1_sampling_steps"].trials} == {10, 20, 50, 200}
    ss = by_name["paper_toy1_scale_shift"]
    cfgs = {t.factors["scale_shift"]: ss.trial_config(t.factors, t.seed) for t in ss.trials}
    assert (cfgs["image_default"].data.scale, cfgs["image_default"].data.shift) == (0.39, 0.60)
    fm = by_name["paper_fashion_mnist"]
    kinds = {t.factors["method"]: fm.trial_config(t.factors, t.seed).diffusion.kind for t in fm.trials}
    assert kinds == {"beta_klub": "beta", "beta_elbo": "beta", "gaussian": "gaussian"}


def test_bad_variants_are_rejected(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\nbase: toy1_beta\nfactors:\n  variants:\n    method:\n"
                 "      g: {diffusion.kind: gaussian, diffusion.lss: eps_mse}\n")
    with pytest.raises(SweepError, match=r"factors.variants.method.g.diffusion.lss"):
        load_sweep(p)
    p.write_text("name: bad\nbase: toy1_beta\nfactors:\n  variants:\n    method:\n"
                 "      g: {diffusion.kind: gaussian}\n")  # klub is not a Gaussian loss
    with pytest.raises(SweepError, match=r"factors.variants.method.g"):
        load_sweep(p)


@pytest.mark.ray
def test_fashion_mnist_smoke_end_to_end(tmp_path):
    env_cmd = [sys.executable, "-m", "betadiff.cli"]
    run = subprocess.run([*env_cmd, "sweep", "run", str(ROOT / "sweeps/paper/fashion_mnist.yaml"), "--smoke"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rep = subprocess.run([*env_cmd, "report", "paper_fashion_mnist_smoke", "--tracking-uri", "sqlite:///mlflow.db",
                          "--experiment", "paper", "--rows", "method", "--metrics", "fd", "boundary_err",
                          "out_of_range", "--format", "json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr[-2000:]
    cells = json.loads(rep.stdout)
    text = json.dumps(cells)
    for level in ("beta_klub", "beta_elbo", "gaussian"):
        assert level in text
