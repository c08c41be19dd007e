"""The CLI in a subprocess: train prints one JSON line and writes the run folder; sample; bad input exits 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.steps=20", "train.batch_size=128", "train.log_every=10", "train.eval_every=0", "train.ckpt_every=10",
        "eval.n_samples=1000", "eval.steps=10", "model.width=32"]


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "betadiff.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_train_then_sample(tmp_path):
    r = cli("train", "toy1_beta", *TINY, "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"jsd", "w1", "hellinger", "out_of_range", "loss"} <= set(out)
    for f in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "samples.png", "final.json"):
        assert (tmp_path / "run" / f).is_file(), f
    r = cli("sample", str(tmp_path / "run"), "-n", "300", "-o", str(tmp_path / "s.npy"), "--steps", "10")
    assert r.returncode == 0, r.stderr
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (300, 1) and x.min() >= 0 and x.max() <= 1


def test_dry_run_prints_resolved_config():
    r = cli("train", "toy2_gaussian", "train.steps=5", "--dry-run")
    assert r.returncode == 0 and "steps: 5" in r.stdout and "kind: gaussian" in r.stdout


def test_bad_config_one_line_exit_2(tmp_path):
    for args, frag in [(["toy1_beta", "train.stepz=3"], "stepz"), (["toy1_beta", "diffusion.eta=0"], "diffusion.eta"),
                       (["nope.yaml"], "not found"), (["toy1_beta", "diffusion.c1=20"], "diffusion.c1")]:
        r = cli("train", *args, "--run-dir", str(tmp_path / "x"))
        assert r.returncode == 2, (args, r.stderr)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("betadiff: error:") and frag in err[0], err
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


def test_bad_data_file_exit_2(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("0.1\n0.5\nnan\n")
    r = cli("train", "toy1_beta", "data.name=file", f"data.path={bad}", "data.low=0", "data.high=1")
    assert r.returncode == 2 and "bad.csv" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    out = tmp_path / "out.npy"
    np.save(out, np.array([0.2, 1.5]))
    r = cli("train", "toy1_beta", "data.name=file", f"data.path={out}", "data.low=0", "data.high=1")
    assert r.returncode == 2 and "out.npy" in r.stderr, r.stderr
