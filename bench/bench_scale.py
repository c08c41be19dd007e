"""Platform scale simulation: many trivially short trials (no torch) through Ray Tune + an MLflow server.

    platform/local/up --workers 1                      # or any Ray cluster + MLflow server
    set -a; . .betadiff/stack.env; set +a
    python bench/bench_scale.py [--trials 500] [--steps 5] [--concurrency 4] [--out bench/out]

Each trial does what a betadiff trial does to the tracking server, minus the training: one child run under
a sweep parent run (create_run with tags), its params (log_batch), one synchronous log_batch of metrics per
reported step (what the sweep callback sends per `tune.report`), and set_terminated. Every request is timed
inside the trial. Measured:
  - per-trial overhead: what Ray Tune adds per trial beyond the trial's own work,
    concurrency * wall / trials - mean in-trial time;
  - MLflow write latency p50/p95/p99 per request type, as seen by the trials under this concurrency;
  - completeness: runs and metric points on the server afterwards (must equal what was sent).
Writes <out>/scale.json and <out>/scale.md. Needs MLFLOW_TRACKING_URI=http://... (a server, not SQLite).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import urllib.request
import uuid
from pathlib import Path

N_PARAMS = 40  # a flattened TrainConfig has about this many keys


def trial_fn(config: dict) -> None:
    """One simulated trial; every tracking request is timed (ms)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from ray import tune

    t_start = time.perf_counter()
    c = MlflowClient(tracking_uri=config["uri"])
    lat: dict[str, list[float]] = {"create_run": [], "log_params": [], "log_metrics": [], "terminate": []}

    def timed(kind, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        lat[kind].append((time.perf_counter() - t0) * 1e3)
        return out

    run = timed("create_run", c.create_run, config["experiment_id"], run_name=f"t{config['i']}",
                tags={"mlflow.parentRunId": config["parent"], "betadiff.role": "trial",
                      "betadiff.trial_id": str(config["i"])})  # fmt: skip
    rid = run.info.run_id
    params = [Param(f"p{k}", str(k * config["x"])) for k in range(N_PARAMS)]
    timed("log_params", c.log_batch, rid, params=params)
    for step in range(1, config["steps"] + 1):
        ts = int(time.time() * 1000)
        metrics = [Metric(k, config["x"] / step, ts, step) for k in ("loss", "lr", "step_time_ms")]
        timed("log_metrics", c.log_batch, rid, metrics=metrics, synchronous=True)
        last = step == config["steps"]
        if last:
            timed("terminate", c.set_terminated, rid)
        report = {"loss": config["x"] / step}
        if last:
            report["work_s"] = time.perf_counter() - t_start
            report["lat"] = json.dumps({k: [round(v, 3) for v in vs] for k, vs in lat.items()})
        tune.report(report)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def _server_counts(uri: str, experiment_id: str, parent: str) -> tuple[int, int]:
    """Child runs and metric points stored by the server (REST API, paged)."""

    def post(path, body):
        req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        return json.loads(urllib.request.urlopen(req, timeout=60).read())

    runs, token = [], None
    while True:
        body = {"experiment_ids": [experiment_id], "filter": f"tags.`mlflow.parentRunId` = '{parent}'",
                "max_results": 1000}  # fmt: skip
        if token:
            body["page_token"] = token
        out = post("runs/search", body)
        runs += out.get("runs", [])
        token = out.get("next_page_token")
        if not token:
            break
    points = 0
    for r in runs:
        for key in ("loss", "lr", "step_time_ms"):
            q = f"run_id={r['info']['run_id']}&metric_key={key}&max_results=25000"
            with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/metrics/get-history?{q}", timeout=60) as resp:
                points += len(json.loads(resp.read()).get("metrics", []))
    return len(runs), points


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--steps", type=int, default=5, help="reported steps (metric writes) per trial")
    ap.add_argument("--concurrency", type=int, default=4, help="max concurrent trials")
    ap.add_argument("--cpus-per-trial", type=float, default=0.5)
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (RAY_ADDRESS)")
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    ap.add_argument("--out", default="bench/out")
    a = ap.parse_args(argv)
    if not a.tracking_uri or not a.tracking_uri.startswith("http"):
        print(f"bench_scale: error: --tracking-uri / MLFLOW_TRACKING_URI must be an http:// MLflow server, "
              f"got {a.tracking_uri!r} (start one with platform/local/up)", file=sys.stderr)  # fmt: skip
        return 2
    for name in ("trials", "steps", "concurrency"):
        if getattr(a, name) < 1:
            print(f"bench_scale: error: --{name} must be >= 1", file=sys.stderr)
            return 2

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    uri = a.tracking_uri.rstrip("/")
    client = MlflowClient(tracking_uri=uri)
    name = f"bench_scale_{uuid.uuid4().hex[:6]}"
    exp_id = client.create_experiment(name)
    parent = client.create_run(exp_id, run_name=name, tags={"betadiff.role": "sweep"}).info.run_id

    ray.init(address=a.address, log_to_driver=False, include_dashboard=False if not a.address else None)
    storage = Path(a.out).resolve() / "scale_tune"
    tuner = tune.Tuner(
        tune.with_resources(trial_fn, {"cpu": a.cpus_per_trial}),
        param_space={"uri": uri, "experiment_id": exp_id, "parent": parent, "steps": a.steps,
                     "i": tune.grid_search(list(range(a.trials))), "x": 1.0},
        tune_config=tune.TuneConfig(max_concurrent_trials=a.concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0),
    )  # fmt: skip
    t0 = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - t0
    client.set_terminated(parent)
    resources = ray.cluster_resources()
    ray.shutdown()

    df = results.get_dataframe()
    errors = sum(1 for r in results if r.error is not None)
    lat: dict[str, list[float]] = {}
    for s in df["lat"].dropna():
        for k, vs in json.loads(s).items():
            lat.setdefault(k, []).extend(vs)
    work = df["work_s"].dropna().tolist()
    runs, points = _server_counts(uri, exp_id, parent)
    expected_points = a.trials * a.steps * 3
    all_writes = [v for vs in lat.values() for v in vs]
    summary = {
        "trials": a.trials,
        "steps_per_trial": a.steps,
        "concurrency": a.concurrency,
        "cluster_cpus": resources.get("CPU"),
        "wall_s": round(wall, 2),
        "trials_per_s": round(a.trials / wall, 3),
        "mean_trial_work_s": round(statistics.mean(work), 4),
        "per_trial_overhead_s": round(a.concurrency * wall / a.trials - statistics.mean(work), 4),
        "writes_per_s": round(len(all_writes) / wall, 1),
        "latency_ms": {
            k: {"n": len(v), **{f"p{q}": round(_pct(v, q), 2) for q in (50, 95, 99)}}
            for k, v in sorted(lat.items())
        },
        "latency_ms_all": {"p50": round(_pct(all_writes, 50), 2), "p95": round(_pct(all_writes, 95), 2)},
        "server_runs": runs,
        "server_metric_points": points,
        "expected_metric_points": expected_points,
        "errored_trials": errors,
        "tracking_uri": uri,
        "ray_address": a.address or "local",
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
        "command": "python bench/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = "\n".join(
        f"| {k} | {v['n']} | {v['p50']} | {v['p95']} | {v['p99']} |" for k, v in summary["latency_ms"].items()
    )
    (out / "scale.md").write_text(
        f"# Scale simulation: {a.trials} trivial trials through Ray Tune + MLflow server\n\n"
        f"`{summary['command']}` on {os.cpu_count()} CPUs, Ray {ray.__version__}, "
        f"concurrency {a.concurrency}, {a.steps} metric writes per trial.\n\n"
        f"- wall {summary['wall_s']} s, {summary['trials_per_s']} trials/s, "
        f"{summary['writes_per_s']} writes/s\n"
        f"- mean in-trial time {summary['mean_trial_work_s']} s; Tune overhead per trial "
        f"{summary['per_trial_overhead_s']} s (concurrency x wall / trials - in-trial time)\n"
        f"- server holds {runs}/{a.trials} child runs and {points}/{expected_points} metric points; "
        f"{errors} errored trials\n\n"
        "| request | n | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|\n" + rows + "\n"
    )
    print((out / "scale.md").read_text())
    return 0 if runs == a.trials and points == expected_points and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
