"""Sweep-file validation and expansion (pure: no Ray, no MLflow).

Each bad file gives one line naming the file, the key path and the problem, and exit code 2.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from betadiff.sweep.schema import SweepError, load_sweep

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "train.steps": 40,
    "train.eval_every": 20,
    "train.ckpt_every": 20,
    "train.log_every": 10,
    "eval.n_samples": 2000,
    "eval.steps": 20,
}


def write(tmp_path: Path, doc: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def base_doc(**extra) -> dict:
    doc = {
        "name": "t",
        "base": "toy1_beta.yaml",
        "overrides": dict(TINY),
        "factors": {"axes": {"diffusion.loss": ["klub", "elbo"]}},
        "seeds": [0, 1],
    }
    doc.update(extra)
    return doc


def test_grid_expands_factors_times_seeds(tmp_path):
    doc = base_doc(factors={"axes": {"diffusion.loss": ["klub", "elbo"], "optim.lr": [1e-3, 2e-3, 4e-3]}})
    s = load_sweep(write(tmp_path, doc))
    assert len(s.trials) == 2 * 3 * 2
    assert len({t.key for t in s.trials}) == len(s.trials)
    assert s.base.train.steps == 40 and s.base.data.name == "toy1"
    cfg = s.trial_config(s.trials[-1].factors, s.trials[-1].seed)
    assert (cfg.diffusion.loss, cfg.optim.lr, cfg.train.seed) == ("elbo", 4e-3, 1)


def test_one_at_a_time_from_baseline(tmp_path):
    doc = base_doc(
        seeds=3,
        factors={
            "design": "one_at_a_time",
            "baseline": {"optim.lr": 2e-3},
            "axes": {"diffusion.loss": ["klub", "elbo", "l2"], "optim.lr": [1e-3, 2e-3]},
        },
    )
    s = load_sweep(write(tmp_path, doc))
    points = {tuple(sorted(t.factors.items())) for t in s.trials}
    # baseline (klub, 2e-3); loss moved alone: elbo, l2; lr moved alone: 1e-3  -> 4 points x 3 seeds
    assert len(points) == 4 and len(s.trials) == 12 and s.seeds == [0, 1, 2]
    assert (("diffusion.loss", "klub"), ("optim.lr", 1e-3)) in points
    assert (("diffusion.loss", "elbo"), ("optim.lr", 0.002)) in points


def test_inline_base_and_search(tmp_path):
    doc = {
        "name": "s",
        "base": {"data": {"name": "toy1"}, "train": {"steps": 30, "eval_every": 10}},
        "seeds": [3],
        "search": {
            "sampler": "tpe",
            "num_samples": 4,
            "metrics": [{"name": "w1"}, {"name": "jsd"}],
            "space": {
                "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                "model.width": {"type": "choice", "values": [32, 64]},
                "model.depth": {"type": "int", "low": 1, "high": 3},
            },
        },
    }
    s = load_sweep(write(tmp_path, doc))
    assert [(m.name, m.mode) for m in s.metrics] == [("w1", "min"), ("jsd", "min")]
    assert s.base.train.steps == 30 and s.base_source == "inline"


def test_shipped_sweeps_validate():
    files = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert files
    for f in files:
        assert load_sweep(f).trials


def test_same_file_same_hash(tmp_path):
    a = load_sweep(write(tmp_path, base_doc(), "a.yaml"))
    b = load_sweep(write(tmp_path, base_doc(), "b.yaml"))
    c = load_sweep(write(tmp_path, base_doc(seeds=[0, 2]), "c.yaml"))
    assert a.sweep_hash == b.sweep_hash != c.sweep_hash


BAD = [
    ("unknown top key", {"nmae": "x"}, "nmae", "unknown key"),
    ("unknown nested key", {"resources": {"cpus": 2}}, "resources.cpus", "unknown key"),
    ("wrong type", {"max_failures": "many"}, "max_failures", "max_failures"),
    (
        "empty factor",
        {"factors": {"axes": {"diffusion.loss": []}}},
        "factors.axes.diffusion.loss",
        "non-empty",
    ),
    (
        "absent key",
        {"factors": {"axes": {"diffusion.lossx": ["klub"]}}},
        "factors.axes.diffusion.lossx",
        "not a key of the base config",
    ),
    (
        "bad factor value",
        {"factors": {"axes": {"diffusion.loss": ["klub", "nope"]}}},
        "factors.axes.diffusion.loss",
        "nope",
    ),
    ("absent override", {"overrides": {"train.stepz": 3}}, "overrides.train.stepz", "not a key"),
    (
        "loguniform low<=0",
        {
            "factors": {"axes": {}},
            "search": {
                "metrics": [{"name": "w1"}],
                "space": {"optim.lr": {"type": "loguniform", "low": 0, "high": 1}},
            },
        },
        "search.space.optim.lr.low",
        "low > 0",
    ),
    (
        "unreported metric",
        {
            "factors": {"axes": {}},
            "search": {
                "metrics": [{"name": "fid"}],
                "space": {"optim.lr": {"type": "uniform", "low": 0.1, "high": 1}},
            },
        },
        "search.metrics.0.name",
        "never reported",
    ),
    ("report metric", {"report": {"metrics": ["ot"]}}, "report.metrics.0", "never reported"),
    (
        "searched seed",
        {
            "factors": {"axes": {}},
            "search": {
                "metrics": [{"name": "w1"}],
                "space": {"train.seed": {"type": "int", "low": 0, "high": 3}},
            },
        },
        "search.space.train.seed",
        "never searched",
    ),
    ("fractional gpu", {"resources": {"gpu": 0.5}}, "resources.gpu", "fractional"),
    ("data parallel", {"resources": {"gpu": 1, "workers": 2}}, "resources.workers", "data-parallel"),
    ("bad scheduler", {"scheduler": {"type": "pbt"}}, "scheduler.type", "asha"),
    ("missing name", {"name": None}, "name", ""),
    ("bad base", {"base": "no_such_config.yaml"}, "base", "not found"),
    ("dup seeds", {"seeds": [1, 1]}, "seeds", "duplicate"),
    ("report rows", {"report": {"rows": ["optim.lr"]}}, "report.rows.0", "not a varied key"),
]


@pytest.mark.parametrize("what,patch,key,problem", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_file_key_problem(tmp_path, what, patch, key, problem):
    doc = base_doc()
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k] = {**doc[k], **v}
        else:
            doc[k] = v
    p = write(tmp_path, doc)
    with pytest.raises(SweepError) as e:
        load_sweep(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(p)), msg
    assert f"'{key}'" in msg and problem in msg, msg


def test_cli_bad_file_exits_nonzero_with_one_line(tmp_path):
    p = write(tmp_path, base_doc(factors={"axes": {"model.widthh": [1]}}))
    r = subprocess.run(
        [sys.executable, "-m", "betadiff.sweep.cli", "run", str(p), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(p) in lines[0] and "factors.axes.model.widthh" in lines[0], r.stderr


def test_gpu_nobody_can_place_is_rejected_before_work(tmp_path):
    p = write(tmp_path, base_doc(resources={"gpu": 1}))
    r = subprocess.run(
        [sys.executable, "-m", "betadiff.sweep.cli", "run", str(p), "--dry-run", "--no-measure"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert (
        r.returncode == 2
        and "resources.gpu" in r.stderr
        and "cannot place" in r.stderr
        and str(p) in r.stderr
    ), r.stderr + r.stdout


def test_core_does_not_import_platform_libraries():
    code = (
        "import sys, betadiff, betadiff.config, betadiff.train, betadiff.sweep, betadiff.sweep.schema;"
        "bad = [m for m in ('ray', 'mlflow', 'optuna') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "args,patch,needle",
    [
        (["--address", "127.0.0.1:9"], {}, "Ray address 127.0.0.1:9"),
        ([], {"tracking": {"uri": "http://127.0.0.1:9"}}, "tracking URI http://127.0.0.1:9"),
        ([], {"tracking": {"uri": "postgresql://postgres@127.0.0.1:9/x"}}, "tracking URI postgresql"),
    ],
    ids=["ray", "mlflow-http", "mlflow-postgres"],
)
def test_unreachable_service_fails_fast_with_one_line(tmp_path, args, patch, needle):
    p = write(tmp_path, {**base_doc(), **patch})
    r = subprocess.run(
        [sys.executable, "-m", "betadiff.sweep.cli", "run", str(p), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / ".betadiff").exists()  # nothing started


def test_unreachable_job_server(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "betadiff.sweep.cli",
            "status",
            "raysubmit_x",
            "--address",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 2 and "127.0.0.1:9" in r.stderr, r.stderr


def test_job_upload_over_ray_limit_is_refused_before_submitting(tmp_path):
    from betadiff.sweep.jobs import JobError, _submit, working_dir_size

    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / ".git").mkdir()
    with open(tmp_path / ".git" / "pack", "wb") as f:  # excluded: .git never travels
        f.truncate(300 * 2**20)
    assert working_dir_size(tmp_path)[0] < 2**20
    with open(tmp_path / "weights.bin", "wb") as f:  # sparse: sized, not written
        f.truncate(101 * 2**20)
    with pytest.raises(JobError) as e:  # the address is never contacted: the size check comes first
        _submit("http://127.0.0.1:9", "true", {}, "big", tmp_path)
    assert "weights.bin" in str(e.value) and "100 MiB" in str(e.value) and "\n" not in str(e.value)


def test_slice_keeps_some_levels_and_seeds_and_records_them(tmp_path):
    doc = base_doc(
        factors={
            "axes": {"diffusion.eta": [100.0, 1000.0, 10000.0]},
            "variants": {"method": {"klub": {"diffusion.loss": "klub"}, "elbo": {"diffusion.loss": "elbo"}}},
        },
        seeds=3,
    )
    p = write(tmp_path, doc)
    full = load_sweep(p)
    part = load_sweep(p, name="t_part", only={"method": ["elbo"], "diffusion.eta": ["1e2", "10000"]}, seeds=[2])
    assert len(full.trials) == 3 * 2 * 3 and len(part.trials) == 2
    assert {(t.factors["method"], t.factors["diffusion.eta"], t.seed) for t in part.trials} == {
        ("elbo", 100.0, 2),
        ("elbo", 10000.0, 2),
    }
    resolved = yaml.safe_load(part.resolved_yaml)  # the parent run's sweep.yaml says what this slice ran
    assert resolved["name"] == "t_part" and resolved["seeds"] == [2]
    assert list(resolved["factors"]["variants"]["method"]) == ["elbo"]
    assert part.sweep_hash != full.sweep_hash


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--only", "optim.lr=1e-3"], "--only optim.lr': not a factor of this sweep (factors: diffusion.loss)"),
        (["--only", "diffusion.loss=klubb"], "no level 'klubb' (levels: klub, elbo)"),
        (["--only", "diffusion.loss"], "--only wants FACTOR=LEVEL"),
        (["--seeds", "a,b"], "--seeds wants integers"),
        (["bogus.key=1"], "key 'bogus': unknown key"),
        (["overrides.train.stepz=30"], "key 'overrides.train.stepz': not a key of the base config"),
        (["max_concurrent=many"], "key 'max_concurrent'"),
        (["--seeds", "0", "=3"], "=3"),
    ],
)
def test_bad_slice_is_one_line_before_work(tmp_path, args, needle):
    p = write(tmp_path, base_doc())
    r = subprocess.run(
        [sys.executable, "-m", "betadiff.sweep.cli", "run", str(p), "--dry-run", "--no-measure", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_command_line_edits_are_typed_and_recorded(tmp_path):
    p = write(tmp_path, base_doc())
    s = load_sweep(p, sets=["max_concurrent=1", "overrides.train.steps=30", "seeds=[4]", "overrides.optim.lr=1e-3"])
    assert s.spec.max_concurrent == 1 and s.seeds == [4]
    assert s.base.train.steps == 30 and s.base.optim.lr == 1e-3 and s.base.train.eval_every == TINY["train.eval_every"]
    resolved = yaml.safe_load(s.resolved_yaml)  # the parent run's sweep.yaml records the edits
    assert resolved["max_concurrent"] == 1 and resolved["overrides"]["train.steps"] == 30
    assert s.sweep_hash != load_sweep(p).sweep_hash
    r = subprocess.run(  # edits may follow options
        [sys.executable, "-m", "betadiff.sweep.cli", "run", str(p), "--dry-run", "--no-measure", "--seeds", "0",
         "overrides.train.steps=30"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert r.returncode == 0 and "2 trials" in r.stdout, r.stderr


def test_search_start_points_are_checked(tmp_path):
    search = {
        "num_samples": 2,
        "metrics": [{"name": "w1"}],
        "space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
    }
    doc = base_doc(factors={}, search={**search, "start": [{}, {"optim.lr": 2e-3}]})
    assert len(load_sweep(write(tmp_path, doc)).spec.search.start) == 2
    for start, needle in [
        ([{"optim.lr": 1.0}], "key 'search.start.0.optim.lr': must be a number in [0.0001, 0.01]"),
        ([{"model.width": 64}], "key 'search.start.0.model.width': not a searched key (optim.lr)"),
        ([{}, {}, {}], "key 'search.start': 3 start points but num_samples is 2"),
    ]:
        with pytest.raises(SweepError) as e:
            load_sweep(write(tmp_path, base_doc(factors={}, search={**search, "start": start})))
        assert needle in str(e.value)
