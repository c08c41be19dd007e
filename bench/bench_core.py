"""Core throughput: training steps/s and sampling samples/s, toy MLP and image U-Net, side by side.

    python bench/bench_core.py [--quick] [--out bench/out]

Writes OUT/core.json and OUT/core.md. Rows run in one process, interleaved over `--repeats` rounds, and are
reported with ratios against the first row of their group (the machines are noisy; absolute times are not
compared across runs). Medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from betadiff.config import load_config
from betadiff.data import make_dataset
from betadiff.nets import num_params
from betadiff.train import build_model, generate, objective, use_bf16


def _setup(config: str, overrides: list[str]):
    cfg = load_config(config, overrides)
    ds = make_dataset(cfg.data)
    model = build_model(cfg, ds, torch.device("cpu"))
    opt = torch.optim.Adam(model.denoiser.parameters(), lr=1e-4)
    return cfg, ds, model, opt


def train_step_time(cfg, ds, model, opt, steps: int) -> float:
    """Median seconds per training step (forward + backward + Adam), after one warm-up step."""
    loss_fn, g = objective(model), torch.Generator().manual_seed(0)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16(cfg.train.amp, torch.device("cpu")))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        x0 = model.scale * ds.sample(cfg.train.batch_size, g) + model.shift
        with amp:
            loss, _ = loss_fn(model.denoiser, x0, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sample_time(cfg, model, n: int, steps: int) -> float:
    """Seconds to draw n samples with `steps` sampling steps."""
    t0 = time.perf_counter()
    generate(model, model.denoiser, n, torch.Generator().manual_seed(1), steps=steps, batch_size=n)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and samples (a smoke run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/out")
    a = p.parse_args(argv)
    q = a.quick
    rows = [  # (group, name, config, overrides, train steps, sample n, sample steps)
        ("toy", "toy MLP beta, batch 1000", "toy1_beta", [], 20 if q else 100, 10000 if q else 100000, 5 if q else 20),
        ("toy", "toy MLP gaussian, batch 1000", "toy1_gaussian", [], 20 if q else 100, 10000 if q else 100000,
         5 if q else 20),
        ("image", "U-Net 28x28 beta fp32, batch 64", "fashion_mnist_beta", ["data.name=digits", "data.image_size=28",
                                                                          "train.amp=none"], 2 if q else 10, 64, 2 if q else 5),
    ]
    if use_bf16("auto", torch.device("cpu")):  # emulated bf16 (AVX2-only CPUs) is ~40× slower: not a workload
        rows.append(("image", "U-Net 28x28 beta bf16, batch 64", "fashion_mnist_beta",
                     ["data.name=digits", "data.image_size=28", "train.amp=bf16"], 2 if q else 10, 64, 2 if q else 5))
    setups = [_setup(c, o) for _, _, c, o, *_ in rows]
    res: dict[str, dict] = {r[1]: {"train_s": [], "sample_s": []} for r in rows}
    for _ in range(a.repeats):
        for (group, name, _, _, tsteps, n, ssteps), (cfg, ds, model, opt) in zip(rows, setups):
            res[name]["train_s"].append(train_step_time(cfg, ds, model, opt, tsteps))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16(cfg.train.amp, torch.device("cpu"))):
                res[name]["sample_s"].append(sample_time(cfg, model, n, ssteps) / ssteps)
    out = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "rows": []}
    base: dict[str, dict] = {}
    for (group, name, _, _, _, n, _), (cfg, _, model, _) in zip(rows, setups):
        ts, ss = statistics.median(res[name]["train_s"]), statistics.median(res[name]["sample_s"])
        row = {"group": group, "name": name, "params": num_params(model.denoiser),
               "train_ms_per_step": 1000 * ts, "train_steps_per_s": 1 / ts,
               "sample_batch": n, "samples_per_s_per_step": n / ss}
        b = base.setdefault(group, row)
        row["train_speed_vs_first"] = b["train_ms_per_step"] / row["train_ms_per_step"]
        row["sample_speed_vs_first"] = row["samples_per_s_per_step"] / b["samples_per_s_per_step"]
        out["rows"].append(row)
    d = Path(a.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "core.json").write_text(json.dumps(out, indent=1))
    md = [f"# Core throughput ({out['threads']} torch threads, {out['cpus']} CPUs; medians of {a.repeats} rounds)", "",
          "| workload | params | train ms/step | train steps/s | ×first (train) | sample batch | samples/s per step "
          "| ×first (sample) |", "|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        md.append(f"| {r['name']} | {r['params']:,} | {r['train_ms_per_step']:.1f} | {r['train_steps_per_s']:.1f} | "
                  f"{r['train_speed_vs_first']:.2f} | {r['sample_batch']} | {r['samples_per_s_per_step']:,.0f} | "
                  f"{r['sample_speed_vs_first']:.2f} |")
    (d / "core.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
