"""A real MLflow store (sqlite + local artifacts) laid out by the tracking conventions, for the report and
dashboard tests; other test files load ``build_store`` from this file by path.

Sweep ``toyabl`` varies diffusion.loss ∈ {klub, elbo} × diffusion.eta ∈ {1, 10} over seeds [0, 1, 2]:
- (elbo, 10) has only a FAILED run (a missing cell); (klub, 10) has seeds 0, 1 only (fewer seeds);
- (klub, 1) seed 0 was re-run at budget 60 (a different budget); (elbo, 1) has an extra KILLED/pruned run;
- w1 dips before the last step in some runs, so last != best.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

SWEEP = "toyabl"
EXPERIMENT = "ablate"
BASE_W1 = {("klub", "1"): 0.020, ("klub", "10"): 0.015, ("elbo", "1"): 0.050, ("elbo", "10"): 0.040}


def _png(path: Path, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.random.default_rng(seed).random((8, 8))
    plt.imsave(path, np.kron(img, np.ones((8, 8))), cmap="gray")


def build_store(root: Path) -> dict:
    """Create the store under ``root``; returns uri, sweep file path and the trial plan."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    root = Path(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    sweep_yaml = root / "toyabl.yaml"
    sweep_yaml.write_text(
        textwrap.dedent(f"""\
        name: {SWEEP}
        tracking: {{uri: "{uri}", experiment: {EXPERIMENT}}}
        seeds: [0, 1, 2]
        factors:
          diffusion.loss: [klub, elbo]
          diffusion.eta: [1, 10]
        report: {{rows: [diffusion.loss], cols: [diffusion.eta], metrics: [w1, jsd], value: last}}
        """)
    )
    t0 = 1_700_000_000_000
    parent = client.create_run(
        exp,
        start_time=t0,
        run_name=SWEEP,
        tags={
            "betadiff.role": "sweep",
            "betadiff.sweep": SWEEP,
            "betadiff.status": "FINISHED",
            "betadiff.sweep_hash": "abc123",
        },
    ).info.run_id
    (root / "sweep.yaml").write_text(sweep_yaml.read_text())  # the parent's artifact has the fixed name
    client.log_artifact(parent, str(root / "sweep.yaml"))

    plan = []  # (loss, eta, seed, budget, status)
    for loss in ("klub", "elbo"):
        for eta in ("1", "10"):
            seeds = {("elbo", "10"): [], ("klub", "10"): [0, 1]}.get((loss, eta), [0, 1, 2])
            plan += [(loss, eta, s, 30, "FINISHED") for s in seeds]
    plan += [
        ("elbo", "10", 0, 30, "FAILED"),
        ("klub", "1", 0, 60, "FINISHED"),
        ("elbo", "1", 3, 30, "KILLED"),
    ]
    rng = np.random.default_rng(0)
    trials = []
    for i, (loss, eta, seed, budget, status) in enumerate(plan):
        tags = {
            "mlflow.parentRunId": parent,
            "betadiff.role": "trial",
            "betadiff.sweep": SWEEP,
            "betadiff.trial_id": f"t{i:03d}",
            "betadiff.factor.diffusion.loss": loss,
            "betadiff.factor.diffusion.eta": eta,
            "betadiff.seed": str(seed),
            "betadiff.budget": str(budget),
            "betadiff.git_commit": "0" * 40,
        }
        if status == "FAILED":
            tags["betadiff.error"] = "NonFiniteLossError(step=7)"
        if status == "KILLED":
            tags["betadiff.pruned"] = "true"
        run = client.create_run(exp, start_time=t0 + 1000 * (i + 1), run_name=f"{SWEEP}-{i:03d}", tags=tags)
        rid = run.info.run_id
        params = {
            "diffusion.loss": loss,
            "diffusion.eta": eta,
            "train.steps": str(budget),
            "seed": str(seed),
            "train.lr": "0.001" if i % 2 else "0.002",
            "data.name": "toy1",
        }
        steps = [s for s in (10, 20, 30, 40, 50, 60) if s <= budget]
        if status != "FINISHED":
            steps = steps[:1]
        metrics = []
        for j, step in enumerate(steps):
            w1 = BASE_W1[(loss, eta)] * (1 + 2.0 / (j + 1)) + 0.002 * rng.standard_normal()
            if j == len(steps) - 1 and seed == 1:
                w1 += 0.01  # last worse than best
            ts = t0 + 10_000 * (i + 1) + step
            metrics += [
                Metric("w1", float(w1), ts, step),
                Metric("jsd", float(w1 / 3 + 1e-3 * j), ts, step),
                Metric("step_time_ms", float(3 + rng.random()), ts, step),
                Metric("loss", float(1.0 / (j + 1) + 0.1 * rng.random()), ts, step),
            ]
        client.log_batch(
            rid,
            metrics=metrics,
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag("mlflow.note.content", f"trial {i}")],
        )
        if status == "FINISHED":
            _png(root / "samples.png", i)
            client.log_artifact(rid, str(root / "samples.png"))
        client.set_terminated(rid, status=status, end_time=t0 + 100_000 * (i + 1))
        trials.append(dict(run_id=rid, loss=loss, eta=eta, seed=seed, budget=budget, status=status))
    client.set_terminated(parent, "FINISHED", end_time=t0 + 10_000_000)
    return dict(uri=uri, sweep_yaml=sweep_yaml, parent=parent, trials=trials, experiment_id=exp)


def shared_store(tmp_path_factory) -> dict:
    """build_store once per pytest session (the report and dashboard tests share it, read-only)."""
    import json
    import time

    base = tmp_path_factory.getbasetemp() / "report_store"
    try:
        base.mkdir()  # atomic: the first module to get here builds, later ones read store.json
    except FileExistsError:
        while not (base / "store.json").is_file():
            time.sleep(0.2)
    else:
        s = build_store(base)
        (base / "store.json.tmp").write_text(json.dumps({**s, "sweep_yaml": str(s["sweep_yaml"])}))
        (base / "store.json.tmp").rename(base / "store.json")
    s = json.loads((base / "store.json").read_text())
    return {**s, "sweep_yaml": Path(s["sweep_yaml"])}


def test_store_follows_conventions(tmp_path_factory):
    """The fixture itself: children point at the parent and carry factor/seed/budget tags."""
    from mlflow.tracking import MlflowClient

    s = shared_store(tmp_path_factory)
    client = MlflowClient(tracking_uri=s["uri"])
    kids = client.search_runs([s["experiment_id"]], f"tags.`mlflow.parentRunId` = '{s['parent']}'")
    assert len(kids) == len(s["trials"]) == 11
    assert {k.data.tags["betadiff.factor.diffusion.loss"] for k in kids} == {"klub", "elbo"}
    assert sorted(k.info.status for k in kids).count("FINISHED") == 9
