"""Samplers: Beta-diffusion ancestral sampler (spec §3) and the Gaussian DDPM baseline (spec §8).

Both are plain @torch.no_grad functions over a denoiser callable, with an explicit generator:
    Beta:     denoiser(logit_zt: (B, *D), t: (B,)) -> x0_hat (B, *D) in [shift, shift + scale]
    Gaussian: denoiser(x_t: (B, *D), t: (B,)) -> eps_hat (B, *D)
Grids (spec §3, §9): "uniform_t" is t_k = 1 - k/(N-1)(1 - t_min) plus t = 0 (toy default);
"geometric_alpha" is alpha_k = alpha_min^(1 - k/N) (images), which the authors replace by the uniform-t grid
above 350 steps.
Grid arithmetic (alphas, delta) is float64; the chain runs in the requested dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor

from betadiff.gaussian import ddpm_step
from betadiff.process import (
    grid_geometric_alpha,
    grid_uniform_t,
    sample_logit_prior,
    sample_logit_reverse,
    t_from_alpha,
)

GEOMETRIC_MAX_STEPS = 350  # above this the authors' image sampler switches to the uniform-t grid (spec §3)

Grid = Literal["uniform_t", "geometric_alpha"]
Callback = Callable[[dict[str, Any]], None]


def make_grid(
    schedule: Callable[[Tensor], Tensor], steps: int, grid: Grid = "uniform_t", t_min: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Sampler grid as (ts, alphas), each (steps + 1,) float64, t decreasing from 1 to 0, alpha increasing.

    "geometric_alpha" with steps <= 350: alpha_k = alpha(1)^(1 - k/steps) ending at exactly 1, t_k by
    inverting the schedule; otherwise the uniform-t grid with alpha_k = schedule(t_k).
    """
    if grid not in ("uniform_t", "geometric_alpha"):
        raise ValueError(f"unknown grid {grid!r}; choose 'uniform_t' or 'geometric_alpha'")
    if grid == "geometric_alpha" and steps <= GEOMETRIC_MAX_STEPS:
        alpha_min = float(schedule(torch.ones((), dtype=torch.float64)))
        alphas = grid_geometric_alpha(alpha_min, steps)
        ts = t_from_alpha(schedule, alphas)
        ts[0], ts[-1] = 1.0, 0.0  # exact ends (bisection leaves ~1e-18)
        return ts, alphas
    ts = grid_uniform_t(steps, t_min)
    return ts, schedule(ts)


def _chunked(
    n: int, batch_size: int | None, run: Callable[[int, int], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """Run run(chunk_index, chunk_n) over chunks of at most batch_size samples and concatenate along dim 0
    (trajectories, stacked as (T, n, *D), along dim 1)."""
    size = n if not batch_size else max(1, int(batch_size))
    outs = [run(j, min(size, n - i)) for j, i in enumerate(range(0, n, size))]
    if len(outs) == 1:
        return outs[0]
    merged = {}
    for key, val in outs[0].items():
        if key == "trajectory":
            merged[key] = {
                k: (torch.cat([o[key][k] for o in outs], dim=1) if v.ndim > 1 else v) for k, v in val.items()
            }
        else:
            merged[key] = torch.cat([o[key] for o in outs], dim=0)
    return merged


def _chain(denoiser, state: Tensor, step, ts: Tensor, alphas: Tensor, chunk: int, dtype: torch.dtype, name: str,
           return_trajectory: bool, callback: Callback | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The ancestral loop both samplers share: net call at ts[i], then `step` from grid point i to i + 1.

    `step(state, net_out, i)` returns the new state (Beta: x0_hat is the net output) or (new state, x0_hat)
    (Gaussian: the net predicts eps). Returns (final state, last x0_hat, {name: (T+1, n, *D), "x0_hat": (T, ...)}).
    """
    n = state.shape[0]
    traj_s, traj_x = [state], []
    x0_hat = state
    for i in range(len(ts) - 1):
        t = ts[i].to(dtype=dtype, device=state.device).expand(n)
        net_out = denoiser(state, t)
        new = step(state, net_out, i)
        state, x0_hat = new if isinstance(new, tuple) else (new, net_out)
        if return_trajectory:
            traj_s.append(state)
            traj_x.append(x0_hat)
        if callback is not None:
            callback({"i": i, "chunk": chunk, "t": float(ts[i]), "alpha_t": float(alphas[i]),
                      "alpha_s": float(alphas[i + 1]), "x0_hat": x0_hat, name: state})
    traj = {name: torch.stack(traj_s), "x0_hat": torch.stack(traj_x)} if return_trajectory else {}
    return state, x0_hat, traj


@torch.no_grad()
def sample_beta(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    shape: tuple[int, ...],
    *,
    eta: float,
    scale: float,
    shift: float,
    schedule: Callable[[Tensor], Tensor],
    mu: float | Tensor = 0.5,
    steps: int = 200,
    grid: Grid = "uniform_t",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    return_trajectory: bool = False,
    batch_size: int | None = None,
    callback: Callback | None = None,
    t_min: float = 1e-5,
) -> dict[str, Any]:
    """Beta-diffusion ancestral sampler (spec §3): prior logit z_1, then logit z_s = logsumexp(l, b, l + b).

    shape: (N, *D). mu: the prior mean in RAW space, m in [0, 1] (float or (*D), e.g. the per-pixel
    training mean; 0.5 for the toy); the prior is Beta(eta alpha_min mu', eta (1 - alpha_min mu')) with
    mu' = scale m + shift.
    batch_size: run the chain on chunks of at most this many samples (the generator is consumed chunk by
    chunk). callback(info) after every step with keys i, chunk, t, alpha_t, alpha_s, x0_hat and logit_z
    (the new logit z_s).
    Returns a dict in model space [shift, shift + scale]:
      x0_hat (N, *D): the last network output (the main output);  z0 (N, *D): sigmoid(final logit) / alpha_N;
      trajectory (if requested): t (steps+1,), alpha (steps+1,), logit_z (steps+1, N, *D),
      x0_hat (steps, N, *D).
    """
    ts, alphas = make_grid(schedule, steps, grid, t_min)
    mu_model = scale * torch.as_tensor(mu, dtype=dtype, device=device) + shift

    def run(chunk: int, n: int) -> dict[str, Any]:
        logit_z = sample_logit_prior((n, *shape[1:]), mu_model, alphas[0], eta, generator, dtype, device)

        def step(z: Tensor, x0_hat: Tensor, i: int) -> Tensor:
            return sample_logit_reverse(z, x0_hat, alphas[i + 1], alphas[i], eta, generator)

        logit_z, x0_hat, traj = _chain(denoiser, logit_z, step, ts, alphas, chunk, dtype, "logit_z",
                                       return_trajectory, callback)
        out = {"x0_hat": x0_hat, "z0": torch.sigmoid(logit_z) / alphas[-1].to(dtype)}
        if return_trajectory:
            out["trajectory"] = {"t": ts, "alpha": alphas, **traj}
        return out

    return _chunked(shape[0], batch_size, run)


@torch.no_grad()
def sample_gaussian(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    shape: tuple[int, ...],
    *,
    schedule: Callable[[Tensor], Tensor],
    steps: int = 200,
    grid: Grid = "uniform_t",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    return_trajectory: bool = False,
    batch_size: int | None = None,
    callback: Callback | None = None,
    t_min: float = 1e-5,
) -> dict[str, Any]:
    """Gaussian DDPM ancestral sampler (spec §8): x_1 ~ N(0, I), posterior-variance steps, x0_hat unclipped.

    The grid is the Beta sampler's (make_grid) with alpha_bar_k = its alpha_k (default uniform t, spec §8).

    shape: (N, *D). Returns raw-space tensors x0_hat (N, *D) (the last eps-based estimate) and x0 (N, *D) (the
    final state), plus trajectory (t, alpha_bar, x (steps+1, N, *D), x0_hat (steps, N, *D)) if requested.
    callback(info) after every step with keys i, chunk, t, alpha_t, alpha_s, x0_hat, x.
    """
    ts, alpha_bars = make_grid(schedule, steps, grid, t_min)

    def run(chunk: int, n: int) -> dict[str, Any]:
        x = torch.randn((n, *shape[1:]), dtype=dtype, device=device, generator=generator)

        def step(x_t: Tensor, eps_hat: Tensor, i: int) -> tuple[Tensor, Tensor]:
            return ddpm_step(x_t, eps_hat, alpha_bars[i + 1], alpha_bars[i], generator)

        x, x0_hat, traj = _chain(denoiser, x, step, ts, alpha_bars, chunk, dtype, "x", return_trajectory, callback)
        out = {"x0_hat": x0_hat, "x0": x}
        if return_trajectory:
            out["trajectory"] = {"t": ts, "alpha_bar": alpha_bars, **traj}
        return out

    return _chunked(shape[0], batch_size, run)


__all__ = ["GEOMETRIC_MAX_STEPS", "make_grid", "sample_beta", "sample_gaussian"]
