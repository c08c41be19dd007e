"""Why Toy2's JSD is noisy: its point masses 0.5 and 0.8 sit exactly on edges of the spec's 100 bins.

    python bench/toy2_bin_edges.py --run-id RUN_ID [RUN_ID ...] [--tracking-uri sqlite:///mlflow.db] [--out bench/out]
    python bench/toy2_bin_edges.py --checkpoint runs/toy2_beta/checkpoint.pt [...]

Bins are [k/100, (k+1)/100): a generated point mass at 0.49999 lands in bin 49, at 0.50001 in bin 50, while every
true sample (exactly 0.5) lands in bin 50. A model that puts the mass of a point within 1e-4 of it but on the low
side pays up to ≈0.043 of JSD per point mass. This loads a trained Toy2 model (a sweep trial's checkpoint artifact
or a file), draws `--n` samples as the evaluation does (x̂0, 200 steps, seed 0) and reports, beside the spec's JSD,
Hellinger and W1: the share of generated samples within ±`--window` of each point mass and the share of those
below it, the 5 % and 95 % quantiles of their offsets from it, and the same JSD and Hellinger on bins shifted by
half a bin (edges at (k + ½)/100, so no point mass of Toy2 sits on an edge). One row per model (several seeds side
by side). Writes OUT/toy2_bin_edges.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from betadiff import metrics
from betadiff.config import DataConfig
from betadiff.data import make_dataset
from betadiff.train import _seeded, generate, load_model

POINT_MASSES = (0.5, 0.8)


def shifted_histogram(x: torch.Tensor, bins: int = metrics.BINS) -> torch.Tensor:
    """(bins + 1,) probabilities on edges (k + ½)/bins: half bins at both ends, no Toy2 point mass on an edge."""
    return metrics._pmf(x, (torch.arange(bins, dtype=torch.float64) + 0.5) / bins)


def diagnose(true: torch.Tensor, gen: torch.Tensor, window: float) -> dict:
    out = {"jsd": metrics.hist_jsd(true, gen), "hellinger": metrics.hellinger(true, gen), "w1": metrics.w1(true, gen)}
    p, q = shifted_histogram(true), shifted_histogram(gen)
    out["jsd_shifted_bins"] = metrics.jsd(p, q)
    out["hellinger_shifted_bins"] = metrics.hellinger_pq(p, q)
    g, t = gen.flatten().double(), true.flatten().double()
    out["point_masses"] = []
    for c in POINT_MASSES:
        near = g[(g - c).abs() <= window]
        out["point_masses"].append({
            "at": c,
            "true_share": float((t == float(torch.tensor(c, dtype=true.dtype))).double().mean()),
            "generated_share_within_window": float(len(near) / len(g)),
            # below the bin edge c (float64, as the metric's edges): these land one bin too low
            "share_of_those_below": float((near < c).double().mean()) if len(near) else float("nan"),
            "median_abs_offset": float((near - c).abs().median()) if len(near) else float("nan"),
            # the spread of the generated point mass: the network's x̂0 over the noise of its last input
            "offset_q05": float(torch.quantile(near - c, 0.05)) if len(near) else float("nan"),
            "offset_q95": float(torch.quantile(near - c, 0.95)) if len(near) else float("nan"),
        })
    return out


def oracle(true: torch.Tensor, fresh: torch.Tensor, eps: float) -> list[dict]:
    """No model: a fresh true sample whose point masses are moved by `eps` (up, down, or half each way) scored
    against `true`. An exact sampler scores the floor; moving the point masses by a distance far below any bin's
    width costs as much as a model that misplaces them."""
    x = fresh.flatten().double()
    at = torch.zeros_like(x, dtype=torch.bool)
    for c in POINT_MASSES:
        at |= x == float(torch.tensor(c, dtype=fresh.dtype))
    half = torch.where(torch.arange(len(x)) % 2 == 0, eps, -eps).double()
    rows = []
    for name, move in (("0 (exact)", 0.0), (f"+{eps:g}", eps), (f"−{eps:g}", -eps), (f"±{eps:g}, half each way", half)):
        gen = torch.where(at, x + move, x)
        rows.append({"point_masses_moved": name, "jsd": metrics.hist_jsd(true, gen),
                     "hellinger": metrics.hellinger(true, gen), "w1": metrics.w1(true, gen)})
    return rows


def _checkpoint(source: str, tracking_uri: str, is_run: bool) -> Path:
    if not is_run:
        return Path(source)
    from mlflow.tracking import MlflowClient

    d = tempfile.mkdtemp(prefix="toy2_ckpt_")
    return Path(MlflowClient(tracking_uri=tracking_uri).download_artifacts(source, "checkpoint.pt", d))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-id", nargs="+", help="MLflow runs whose checkpoint.pt artifact is a Toy2 model")
    src.add_argument("--checkpoint", nargs="+", help="checkpoint.pt files")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--window", type=float, default=0.005)
    p.add_argument("--out", default="bench/out")
    p.add_argument("--eps", type=float, default=1e-6, help="how far the oracle moves the true point masses")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    toy2 = make_dataset(DataConfig(name="toy2"))
    true = toy2.reference(a.n, _seeded(0, 4))  # one truth for every model and the oracle
    results = []
    for source in a.run_id or a.checkpoint:
        model = load_model(_checkpoint(source, a.tracking_uri, bool(a.run_id)), use_ema=True)
        if model.cfg.data.name != "toy2":
            p.error(f"{source}: the checkpoint is a {model.cfg.data.name} model, not toy2")
        gen = generate(model, model.denoiser, a.n, _seeded(0, 3))["raw"]
        results.append({"source": source, "seed": model.cfg.train.seed, "n": a.n, "window": a.window,
                        **diagnose(true, gen, a.window)})
    ref = oracle(true, toy2.reference(a.n, _seeded(0, 5)), a.eps)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "toy2_bin_edges.json").write_text(json.dumps({"models": results, "oracle": ref}, indent=2))
    md = [
        f"# Toy2 point masses on bin edges ({a.n} samples a model, evaluation seed 0)",
        "",
        "| model | seed | JSD, spec bins [k/100, (k+1)/100) | JSD, bins shifted by ½ | Hellinger, spec | Hellinger, "
        "shifted | W1 |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [f"| {r['source']} | {r['seed']} | {r['jsd']:.4f} | {r['jsd_shifted_bins']:.4f} | {r['hellinger']:.3f} | "
           f"{r['hellinger_shifted_bins']:.3f} | {r['w1']:.5f} |" for r in results]
    md += [
        "",
        f"Generated samples within ±{a.window} of each point mass; offsets from it in units of 1e-4 (a bin is 100).",
        "",
        "| model | point mass | true share | generated share | of those below it | median |offset| | offset 5 % "
        "| offset 95 % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    md += [f"| {r['source']} | {m['at']} | {m['true_share']:.3f} | {m['generated_share_within_window']:.3f} | "
           f"{m['share_of_those_below']:.3f} | {m['median_abs_offset'] * 1e4:.2f} | {m['offset_q05'] * 1e4:.2f} | "
           f"{m['offset_q95'] * 1e4:.2f} |" for r in results for m in r["point_masses"]]
    md += [
        "",
        "Oracle (no model): a second true sample, its point masses moved, against the first.",
        "",
        "| point masses moved by | JSD, spec bins | Hellinger, spec bins | W1 |",
        "|---|---|---|---|",
    ]
    md += [f"| {r['point_masses_moved']} | {r['jsd']:.4f} | {r['hellinger']:.3f} | {r['w1']:.5f} |" for r in ref]
    (out / "toy2_bin_edges.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
