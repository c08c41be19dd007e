"""Sample figures: PMF vs truth (1-D, as in the paper's toy figures), scatter vs truth (2-D), image grids.

Figures are drawn on matplotlib's object API with the Agg canvas (no pyplot, no global figure state, no
display), so they are safe in worker processes and threads. Inputs are raw samples in data space [0, 1].
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import BINS, histogram

FIGSIZE, DPI = (6.4, 4.0), 100      # toy figures: 640 × 400 pixels
GRID_NROW, GRID_MAX = 8, 64         # image samples: an 8 × 8 grid
PAD = 2                             # pixels between grid tiles


def save_image_grid(x: torch.Tensor, path: str | Path, nrow: int = GRID_NROW, pad: int = PAD,
                    upscale: int = 1) -> tuple[int, int]:
    """Write (N, C, H, W) images (C = 1 or 3, values in [0, 1], clamped) as a PNG grid, `nrow` tiles a row.

    Tiles are separated by `pad` white pixels and each pixel is repeated `upscale` times per axis. Returns the
    PNG size (height, width) = (rows·(H·upscale + pad) + pad, nrow'·(W·upscale + pad) + pad) with
    rows = ⌈N / nrow⌉, nrow' = min(nrow, N).
    """
    x = x.detach().cpu().float().nan_to_num(0.0).clamp(0.0, 1.0)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
        raise ValueError(f"save_image_grid: expected (N>0, 1|3, H, W) images, got {tuple(x.shape)}")
    if upscale > 1:
        x = x.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    n, c, h, w = x.shape
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, top: top + h, left: left + w] = x[i]
    rgb = grid.expand(3, -1, -1) if c == 1 else grid
    pixels = (rgb.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)  # round to the nearest grey level
    matplotlib.image.imsave(path, pixels, format="png")  # one PNG pixel per array element
    return pixels.shape[0], pixels.shape[1]


def _toy1d(ax, gen: torch.Tensor, true: torch.Tensor) -> None:
    centres = (np.arange(BINS) + 0.5) / BINS
    ax.bar(centres, histogram(true).numpy(), width=1.0 / BINS, color="0.75", label="true")
    ax.step(centres, histogram(gen).numpy(), where="mid", color="C3", lw=1.2, label="generated")
    outside = float(((gen < 0) | (gen > 1)).to(torch.float64).mean())
    note = f", {outside:.2%} outside [0, 1] (in the edge bins)" if outside else ""
    ax.set(xlim=(0, 1), xlabel="x", ylabel=f"PMF ({BINS} bins)", title=f"{len(gen)} samples{note}")
    ax.legend(frameon=False)


def _toy2d(ax, gen: np.ndarray, true: np.ndarray) -> None:
    ax.scatter(true[:, 0], true[:, 1], s=2, c="0.6", alpha=0.5, lw=0, label="true")
    ax.scatter(gen[:, 0], gen[:, 1], s=2, c="C3", alpha=0.5, lw=0, label="generated")
    ax.set(xlim=(-0.05, 1.05), ylim=(-0.05, 1.05), aspect="equal", title=f"{len(gen)} samples")
    ax.legend(frameon=False, markerscale=4, loc="upper left")


def plot_samples(dataset, gen_raw: torch.Tensor, path: str | Path,
                 true_raw: torch.Tensor | None = None) -> None:
    """Write a PNG of generated raw samples (N, *dataset.shape) to `path`.

    toy1d: 100-bin PMF of generated vs true; toy2d: scatter over the truth; image: an 8×8 grid of the first 64
    samples (true_raw unused). Without `true_raw` the truth is `dataset.reference(N)` drawn with a fixed seed.
    """
    gen = gen_raw.detach().cpu().float()
    if dataset.kind == "image":
        save_image_grid(gen[:GRID_MAX], path, nrow=GRID_NROW, upscale=max(1, 32 // dataset.shape[-1]))
        return
    if true_raw is None:
        true_raw = dataset.reference(len(gen), torch.Generator().manual_seed(0))
    true = true_raw.detach().cpu().float()
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if dataset.kind == "toy1d":
        _toy1d(ax, gen.reshape(-1), true.reshape(-1))
    elif dataset.kind == "toy2d":
        _toy2d(ax, gen.reshape(-1, 2).numpy(), true.reshape(-1, 2).numpy())
    else:
        raise ValueError(f"plot_samples: unknown dataset kind {dataset.kind!r}")
    ax.set_title(f"{dataset.name}: " + ax.get_title())
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
