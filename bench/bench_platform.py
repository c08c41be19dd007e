"""Platform overhead of `betadiff sweep run` (Ray Tune + MLflow) against the same trials run back to back.

    python bench/bench_platform.py [--trials 8] [--trial-seconds 10] [--out bench/out]

1. Calibrate: the number of Toy1 training steps that takes `--trial-seconds` on one thread here.
2. Ideal: the N trials trained back to back in this process (trainer already imported), divided by the cores
   the sweep uses (min(max_concurrent, CPUs) = 2 here).
3. Wall: `python -m betadiff.sweep.cli run` of the same N trials in a subprocess (Ray start, MLflow, all).
   The same is done with 2 trials; the difference cancels the fixed start-up cost, which gives the marginal
   platform cost per trial = ((wall_N − ideal_N) − (wall_2 − ideal_2)) · cores / (N − 2).
4. MLflow: the cost of one batched metrics report (`SweepTracker.log_metrics`, 12 keys) on SQLite.
Writes `<out>/platform.json` and `<out>/platform.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BASE = {
    "train.batch_size": 1000,
    "model.width": 256,
    "train.eval_every": 0,
    "train.ckpt_every": 0,
    "train.log_every": 100,
    "optim.warmup_steps": 0,
    "eval.n_samples": 2000,
    "eval.steps": 20,
}


def sweep_doc(name: str, n: int, steps: int) -> dict:
    lrs = [round(1e-3 * (1 + i / n), 6) for i in range(n)]
    return {
        "name": name,
        "base": "toy1_beta.yaml",
        "overrides": {**BASE, "train.steps": steps},
        "factors": {"axes": {"optim.lr": lrs}},
        "seeds": [0],
        "resources": {"cpu": 1},
        "max_concurrent": 2,
        "max_failures": 0,
        "tracking": {"experiment": "bench"},
    }


def back_to_back(sweep) -> list[float]:
    import torch

    from betadiff.config import merge_overrides
    from betadiff.train import train

    times = []
    for t in sweep.trials:
        cfg = merge_overrides(
            sweep.trial_config(t.factors, t.seed), {"train.threads": 1, "train.progress": False}
        )
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            train(cfg, run_dir=d)
            times.append(time.perf_counter() - t0)
    torch.set_num_threads(os.cpu_count() or 1)
    return times


def sweep_wall(path: Path, cwd: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "betadiff.sweep.cli", "run", str(path)],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"sweep failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall


def mlflow_report_ms(cwd: Path, n: int = 200) -> float:
    from betadiff.sweep.tracking import SweepTracker

    tr = SweepTracker(f"sqlite:///{cwd / 'bench_log.db'}", "bench_log", "bench_log")
    tr.start_parent("x", "name: bench_log\n")
    rid = tr.start_child("t0", "t0", {}, {"a": 1})
    keys = [
        "loss",
        "lr",
        "step_time_ms",
        "loss_klub_cond",
        "loss_klub_marg",
        "w1",
        "jsd",
        "hellinger",
        "out_of_range",
        "floor_w1",
        "floor_jsd",
        "floor_hellinger",
    ]
    ts = []
    for i in range(n):
        t0 = time.perf_counter()
        tr.log_metrics(rid, {k: float(i) for k in keys}, step=i)
        ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--trial-seconds", type=float, default=10.0)
    ap.add_argument("--out", default="bench/out")
    a = ap.parse_args(argv)
    from betadiff.sweep.runner import measure_step
    from betadiff.sweep.schema import load_sweep

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = min(2, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        probe = load_sweep(sweep_doc("probe", 2, 100))
        import torch

        torch.set_num_threads(1)
        step_ms = measure_step(probe)["step_ms"]
        steps = max(50, int(a.trial_seconds * 1000 / step_ms))
        rows = {}
        for n in (2, a.trials):
            doc = sweep_doc(f"bench{n}", n, steps)
            p = tmp / f"bench{n}.yaml"
            p.write_text(yaml.safe_dump(doc))
            serial = back_to_back(load_sweep(p))
            wall = sweep_wall(p, tmp)
            ideal = sum(serial) / cores
            rows[n] = {
                "trials": n,
                "steps": steps,
                "serial_s": sum(serial),
                "mean_trial_s": statistics.mean(serial),
                "ideal_s": ideal,
                "wall_s": wall,
                "wall_over_ideal": wall / ideal,
            }
        n = a.trials
        marginal = (
            ((rows[n]["wall_s"] - rows[n]["ideal_s"]) - (rows[2]["wall_s"] - rows[2]["ideal_s"]))
            * cores
            / (n - 2)
        )
        fixed = rows[2]["wall_s"] - rows[2]["ideal_s"] - 2 * marginal / cores
        log_ms = mlflow_report_ms(tmp)
    res = {
        "cores": cores,
        "step_ms": step_ms,
        "runs": list(rows.values()),
        "marginal_overhead_s_per_trial": marginal,
        "fixed_startup_s": fixed,
        # what a long sweep of such trials converges to once the fixed start-up is amortised
        "steady_state_wall_over_ideal": 1 + marginal / rows[n]["mean_trial_s"],
        "mlflow_log_batch_ms_per_report": log_ms,
        "command": "python bench/bench_platform.py " + " ".join(argv or sys.argv[1:]),
    }
    (out / "platform.json").write_text(json.dumps(res, indent=2))
    md = [
        "# Platform overhead (`betadiff sweep run`, local Ray, SQLite MLflow)",
        "",
        f"cores used {cores}; step {step_ms:.2f} ms; {steps} steps per trial",
        "",
        "| trials | mean trial s | ideal s | wall s | wall/ideal |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['trials']} | {r['mean_trial_s']:.1f} | {r['ideal_s']:.1f} | {r['wall_s']:.1f} | "
        f"{r['wall_over_ideal']:.3f} |"
        for r in rows.values()
    ]
    md += [
        "",
        f"marginal platform cost per trial: {marginal:.2f} s (steady-state wall/ideal "
        f"{1 + marginal / rows[n]['mean_trial_s']:.3f}); fixed start-up: {fixed:.1f} s; "
        f"MLflow log_batch per report (12 metrics, SQLite): {log_ms:.2f} ms",
        "",
    ]
    (out / "platform.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
