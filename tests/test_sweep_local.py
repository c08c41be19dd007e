"""`betadiff sweep run` on a real local Ray (2 CPUs) with a real SQLite MLflow store.

Oracles: the trainer's own run files (final.json, checkpoint.pt) logged as artifacts, MLflow's records
(statuses, metric histories per step), and the Optuna study journal.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.ray

TINY = {
    "train.steps": 40,
    "train.eval_every": 20,
    "train.ckpt_every": 20,
    "train.log_every": 10,
    "train.batch_size": 256,
    "optim.warmup_steps": 0,
    "model.width": 64,
    "eval.n_samples": 2000,
    "eval.steps": 20,
}


def sweep_file(tmp: Path, name: str, **doc) -> Path:
    d = {
        "name": name,
        "base": "toy1_beta.yaml",
        "overrides": dict(TINY),
        "seeds": [0],
        "resources": {"cpu": 1},
        "max_concurrent": 2,
        "max_failures": 1,
        "tracking": {"experiment": name},
    }
    d.update(doc)
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def cli(*args: str, cwd: Path, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "betadiff.sweep.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def client(where: Path | str):
    """MLflow client of a tracking URI, or of the default SQLite store in the folder `where`."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(where if isinstance(where, str) else f"sqlite:///{where / 'mlflow.db'}")


def runs(cwd: Path | str, experiment: str, role: str):
    from mlflow.entities import ViewType

    c = client(cwd)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs(
        [exp.experiment_id], filter_string=f"tags.`betadiff.role` = '{role}'", run_view_type=ViewType.ALL
    )


def test_local_sweep_parent_children_failure_and_report(tmp_path):
    # one healthy trial and one whose loss goes non-finite at step 2 (lr 1e20): the sweep goes on
    p = sweep_file(
        tmp_path,
        "local",
        factors={"axes": {"optim.lr": [2e-3, 1e20]}},
        report={"rows": ["optim.lr"], "metrics": ["w1", "jsd"]},
    )
    r = cli("run", str(p), cwd=tmp_path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # one trial failed
    assert "parent run" in r.stdout and "mlflow.db" in r.stdout

    (parent,) = runs(tmp_path, "local", "sweep")
    children = runs(tmp_path, "local", "trial")
    assert len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    ok = next(c for c in children if c.data.tags["betadiff.factor.optim.lr"] == "0.002")
    bad = next(c for c in children if c.data.tags["betadiff.factor.optim.lr"] == "1e+20")
    assert ok.info.status == "FINISHED" and bad.info.status == "FAILED"
    assert "non-finite loss" in bad.data.tags["betadiff.error"]
    assert bad.data.tags["betadiff.failures"] == "2"  # first try + one retry (max_failures 1)

    # child: params = flattened config, tags, per-step metrics, artifacts
    assert ok.data.params["optim.lr"] == "0.002" and ok.data.params["train.steps"] == "40"
    assert ok.data.tags["betadiff.seed"] == "0" and ok.data.tags["betadiff.budget"] == "40"
    assert ok.data.tags["betadiff.torch_threads"] == "1"  # = resources.cpu, not Ray's OMP default
    # the machine that ran it (same seed, another CPU: other digits), as /proc/cpuinfo and torch say
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    assert cpu in ok.data.tags["betadiff.machine"] and f"torch {torch.__version__}" in ok.data.tags["betadiff.machine"]
    c = client(tmp_path)
    assert [m.step for m in c.get_metric_history(ok.info.run_id, "loss")] == [10, 20, 30, 40]
    assert [m.step for m in c.get_metric_history(ok.info.run_id, "w1")] == [20, 40]
    arts = {a.path for a in c.list_artifacts(ok.info.run_id)}
    assert {"config.yaml", "samples.png", "checkpoint.pt"} <= arts
    # the tracked values are the trainer's own: its final.json and checkpoint, as logged artifacts
    final = json.loads(Path(c.download_artifacts(ok.info.run_id, "final.json", str(tmp_path))).read_text())
    assert ok.data.metrics["w1"] == final["w1"] and ok.data.metrics["jsd"] == final["jsd"]

    ck = torch.load(c.download_artifacts(ok.info.run_id, "checkpoint.pt", str(tmp_path)), weights_only=True)
    assert ck["step"] == 40 and ck["config"]["optim"]["lr"] == 2e-3

    # parent: status, resolved sweep, report table, best configuration
    assert parent.data.tags["betadiff.status"] == "FAILED"
    assert {"sweep.yaml", "report.md"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}
    best = json.loads(parent.data.tags["betadiff.best_config"])
    assert best["optim.lr"] == "0.002" and best["metric"] == "w1"


def _wait(pred, timeout: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            v = pred()
        except Exception:  # the driver may still be creating the MLflow schema this poll reads
            v = None
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("how", ["sigkill", "ctrl-c"])
def test_kill_driver_then_resume_creates_no_duplicates(tmp_path, how):
    """SIGKILL leaves the runs as they were; Ctrl-C ends the sweep KILLED (exit 130) with its unfinished trial runs
    KILLED and tagged interrupted. Either way `sweep resume` finishes the design without running anything twice."""
    over = {
        **TINY,
        "train.steps": 300,
        "train.eval_every": 100,
        "train.ckpt_every": 50,
        "train.log_every": 50,
        # steps slow enough (≈ 20 ms) that the trial seen past step 100 still runs when the signal lands: with the
        # tiny batch its last 200 steps took less than one poll, and it sometimes finished first (seen in CI)
        "train.batch_size": 16384,
    }
    p = sweep_file(
        tmp_path,
        "resumable",
        overrides=over,
        max_concurrent=1,
        factors={"axes": {"diffusion.loss": ["klub", "elbo", "l2"]}},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "betadiff.sweep.cli", "run", str(p)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def progressed():
            ch = runs(tmp_path, "resumable", "trial")
            done = [c for c in ch if c.info.status == "FINISHED"]
            running = [
                c
                for c in ch
                if c.info.status == "RUNNING"
                and c.data.metrics.get("loss") is not None
                and client(tmp_path).get_metric_history(c.info.run_id, "loss")[-1].step >= 100
            ]
            return (done, running) if done and running else None

        done, running = _wait(progressed, 180, "one finished trial and one past its first checkpoint")
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 130
            (parent,) = runs(tmp_path, "resumable", "sweep")
            assert parent.info.status == "KILLED" and parent.data.tags["betadiff.status"] == "KILLED"
            by_id = {c.info.run_id: c for c in runs(tmp_path, "resumable", "trial")}
            cut = by_id[running[0].info.run_id]
            assert cut.info.status == "KILLED" and cut.data.tags.get("betadiff.interrupted") == "true"
            assert "betadiff.pruned" not in cut.data.tags
            assert all(by_id[c.info.run_id].info.status == "FINISHED" for c in done)
            assert not any(c.info.status == "RUNNING" for c in by_id.values())
    finally:
        with contextlib.suppress(ProcessLookupError):  # after Ctrl-C the group may be gone already
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    finished_before = {c.info.run_id: c.info.end_time for c in done}

    r = cli("resume", "resumable", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    children = runs(tmp_path, "resumable", "trial")
    assert len(children) == 3  # 0 duplicate runs
    assert len({c.data.tags["betadiff.trial_id"] for c in children}) == 3
    assert all(c.info.status == "FINISHED" for c in children)
    for c in children:  # nothing finished ran again
        if c.info.run_id in finished_before:
            assert c.info.end_time == finished_before[c.info.run_id]
    (parent,) = runs(tmp_path, "resumable", "sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags["betadiff.status"] == "FINISHED"
    # the interrupted trial continued from its checkpoint (step >= 100), not from scratch: the steps up to
    # that checkpoint were logged once; only steps after it can repeat
    (resumed,) = [c for c in children if c.info.run_id == running[0].info.run_id]
    steps = [m.step for m in client(tmp_path).get_metric_history(resumed.info.run_id, "loss")]
    assert sorted(set(steps)) == list(range(50, 301, 50))
    assert steps.count(50) == 1 and steps.count(100) == 1, steps


def test_asha_stopped_trials_are_pruned_in_optuna_and_mlflow(tmp_path):
    import optuna

    over = {**TINY, "train.steps": 60}
    p = sweep_file(
        tmp_path,
        "asha",
        overrides=over,
        max_concurrent=1,
        search={
            "sampler": "random",
            "seed": 1,
            "num_samples": 6,
            "metrics": [{"name": "w1"}],
            "space": {"optim.lr": {"type": "loguniform", "low": 1e-5, "high": 3e-2}},
            "start": [{}],  # the base config's lr runs first, under the same ASHA rungs
        },
        scheduler={"type": "asha", "grace_period": 20, "reduction_factor": 2},
    )
    r = cli("run", str(p), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    children = runs(tmp_path, "asha", "trial")
    assert len(children) == 6
    killed = [c for c in children if c.info.status == "KILLED"]
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert killed and finished and len(killed) + len(finished) == 6
    assert all(c.data.tags.get("betadiff.pruned") == "true" for c in killed)
    assert all(int(c.data.params["train.steps"]) == 60 for c in children)

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(
            str(tmp_path / ".betadiff" / "sweeps" / "asha" / "optuna.journal")
        )
    )
    study = optuna.load_study(study_name="asha", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == len(killed)
    assert states.count(optuna.trial.TrialState.COMPLETE) == len(finished)
    # Optuna got the intermediate values at training steps (20, 40), not Tune iterations
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(set(t.intermediate_values) <= {20, 40} and t.intermediate_values for t in pruned)
    from betadiff.sweep.schema import load_sweep

    default_lr = load_sweep(p).base.optim.lr
    first = min(study.trials, key=lambda t: t.number)
    assert first.params == {"optim.lr": default_lr}
    assert sum(float(c.data.params["optim.lr"]) == default_lr for c in children) == 1
