"""Time to reach the paper's Toy1 JSD: our recipe against the authors' recipe, side by side on this machine.

    python bench/bench_recipes.py [--target 0.003] [--eval-every 5000] [--n-samples 20000] [--out bench/out]

Both recipes train Beta KLUB on Toy1 (configs/toy1_beta.yaml: Adam 2e-3, 500-step warm-up, cosine over 50k;
configs/toy1_beta_authors.yaml: Adam 5e-4 constant, 400k) at the same time, one process and one thread each, so
they share the machine's noise. Every `--eval-every` steps each is scored (JSD on `--n-samples` generated vs fresh
true samples, 200 steps); a recipe stops at the first evaluation with JSD ≤ `--target`, or at its own budget.
Reported per recipe: steps to the target, the training time to it (wall time minus evaluation time) and the
ms per step, and the ratio authors/ours. Writes OUT/recipes.json and OUT/recipes.md, and each evaluation as it
happens to OUT/recipes_progress.jsonl.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

RECIPES = {"ours": "toy1_beta", "authors": "toy1_beta_authors"}


class _Reached(Exception):
    pass


def race(job: dict) -> dict:
    """One recipe until its JSD first reaches the target (child process, one thread)."""
    import torch

    from betadiff.config import load_config
    from betadiff.train import train

    torch.set_num_threads(1)
    cfg = load_config(
        job["config"],
        [
            f"train.eval_every={job['eval_every']}",
            "train.ckpt_every=0",
            "train.log_every=1000",
            f"eval.n_samples={job['n_samples']}",
            f"train.seed={job['seed']}",
            "train.threads=1",
            "train.progress=false",
        ],
    )
    t0 = time.perf_counter()
    trace: list[dict] = []
    step_ms: list[float] = []  # one value per log_every steps

    def report(step: int, m: dict) -> None:
        if "step_time_ms" in m:
            step_ms.append(m["step_time_ms"])
        if "jsd" in m:
            trace.append({"step": step, "jsd": m["jsd"], "wall_s": time.perf_counter() - t0})
            with open(job["progress"], "a") as f:  # partial results survive an interrupted race
                f.write(json.dumps({"recipe": job["recipe"], **trace[-1]}) + "\n")
            if m["jsd"] <= job["target"]:
                raise _Reached

    reached = False
    with tempfile.TemporaryDirectory() as d:
        try:
            train(cfg, report=report, run_dir=d, resume=False)
        except _Reached:
            reached = True
    wall = time.perf_counter() - t0
    return {"recipe": job["recipe"], "config": job["config"], "reached": reached, "wall_s": wall, "trace": trace,
            "steps": trace[-1]["step"] if trace else None,
            "ms_per_step": sum(step_ms) / len(step_ms) if step_ms else None, "budget": cfg.train.steps, "lr": cfg.optim.lr,
            "decay": cfg.optim.decay}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=float, default=0.003)
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--n-samples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = out / "recipes_progress.jsonl"
    progress.unlink(missing_ok=True)
    jobs = [{"recipe": r, "config": c, "target": a.target, "eval_every": a.eval_every, "n_samples": a.n_samples,
             "seed": a.seed, "progress": str(progress)} for r, c in RECIPES.items()]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        results = pool.map(race, jobs)
    by = {r["recipe"]: r for r in results}
    for r in results:  # training time to the target: mean step time × steps (evaluations excluded)
        ok = r["reached"] and r["ms_per_step"]
        r["train_s_to_target"] = r["ms_per_step"] * r["steps"] / 1000 if ok else None
    doc = {"target_jsd": a.target, "eval_every": a.eval_every, "n_samples": a.n_samples, "seed": a.seed,
           "python": sys.version.split()[0], "results": results}
    o, t = by["ours"], by["authors"]
    if o["reached"] and t["reached"]:  # same network and batch: the step ratio is the training-time ratio
        doc["ratio_authors_over_ours"] = t["steps"] / o["steps"]
    (out / "recipes.json").write_text(json.dumps(doc, indent=2))
    lines = [
        f"# Time to Toy1 JSD ≤ {a.target}: our recipe vs the authors' (side by side, 1 thread each)",
        "",
        f"JSD on {a.n_samples} samples every {a.eval_every} steps, seed {a.seed}.",
        "",
        "| recipe | optimiser | reached | steps to target | ms/step | training time to target | wall incl. evals |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        tt = f"{r['train_s_to_target'] / 60:.1f} min" if r["train_s_to_target"] else "—"
        ms = f"{r['ms_per_step']:.2f}" if r["ms_per_step"] else "—"
        lines.append(f"| {r['recipe']} | Adam {r['lr']:g}, {r['decay']}, {r['budget']} steps | {r['reached']} | "
                     f"{r['steps'] if r['reached'] else '—'} | {ms} | {tt} | {r['wall_s'] / 60:.1f} min |")
    if "ratio_authors_over_ours" in doc:
        lines += ["", f"The authors' recipe needs **{doc['ratio_authors_over_ours']:.1f}×** our steps (same network and "
                  "batch, so the same factor in training time; ms/step differ only by the machine's noise)."]
    lines += ["", "JSD path (step: JSD):", ""]
    for r in results:
        lines.append(f"- {r['recipe']}: " + ", ".join(f"{x['step']}: {x['jsd']:.4f}" for x in r["trace"]))
    (out / "recipes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
