"""Gaussian (DDPM) baseline process on raw data x0 in [0, 1] (spec §8), pure tensor functions.

Glossary: alpha_bar_t is the VP signal level (the Beta schedule's alpha_t reused as alpha_bar_t);
x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps; the network predicts eps. The ancestral step between
arbitrary grid points s < t (alpha_bar_s > alpha_bar_t) uses the exact posterior q(x_s | x_t, x0_hat) with
variance beta_tilde and no clipping of x0_hat (Ho et al. 2020, eq. 6-7, generalised to skipped steps).

Shapes: data (B, *D); alpha_bar (B,) or 0-d; device and dtype follow the data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from betadiff.process import _bcast


def q_sample(x0: Tensor, alpha_bar_t: Tensor | float, eps: Tensor) -> Tensor:
    """Forward marginal x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps. x0, eps: (B, *D)."""
    ab = _bcast(alpha_bar_t, x0).to(x0.dtype)
    return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps


def predict_x0(x_t: Tensor, eps_hat: Tensor, alpha_bar_t: Tensor | float) -> Tensor:
    """x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t). Not clipped (spec §8)."""
    ab = _bcast(alpha_bar_t, x_t).to(x_t.dtype)
    return (x_t - (1.0 - ab).sqrt() * eps_hat) / ab.sqrt()


def posterior_mean_var(
    x_t: Tensor, x0_hat: Tensor, alpha_bar_s: Tensor | float, alpha_bar_t: Tensor | float
) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_s | x_t, x0) for s < t.

    With alpha_ts = alpha_bar_t / alpha_bar_s and beta_ts = 1 - alpha_ts:
      mean = sqrt(alpha_bar_s) beta_ts / (1 - alpha_bar_t) x0
           + sqrt(alpha_ts) (1 - alpha_bar_s) / (1 - alpha_bar_t) x_t
      var  = beta_tilde = (1 - alpha_bar_s) / (1 - alpha_bar_t) beta_ts      (0 when alpha_bar_s = 1)
    Coefficients in float64 (alpha_bar near 1 cancels); returned in x_t's dtype, var broadcastable to x_t.
    """
    ab_s = _bcast(torch.as_tensor(alpha_bar_s).double(), x_t)
    ab_t = _bcast(torch.as_tensor(alpha_bar_t).double(), x_t)
    alpha_ts = ab_t / ab_s
    beta_ts = 1.0 - alpha_ts
    c0 = ab_s.sqrt() * beta_ts / (1.0 - ab_t)
    ct = alpha_ts.sqrt() * (1.0 - ab_s) / (1.0 - ab_t)
    var = (1.0 - ab_s) / (1.0 - ab_t) * beta_ts
    dt = x_t.dtype
    return c0.to(dt) * x0_hat + ct.to(dt) * x_t, var.clamp_min(0.0).to(dt)


def ddpm_step(
    x_t: Tensor,
    eps_hat: Tensor,
    alpha_bar_s: Tensor | float,
    alpha_bar_t: Tensor | float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """DDPM ancestral step t -> s: x_s ~ N(posterior mean, beta_tilde) with x0_hat from eps_hat.

    x_t, eps_hat: (B, *D). Returns (x_s, x0_hat), both (B, *D).
    """
    x0_hat = predict_x0(x_t, eps_hat, alpha_bar_t)
    mean, var = posterior_mean_var(x_t, x0_hat, alpha_bar_s, alpha_bar_t)
    noise = torch.randn(x_t.shape, dtype=x_t.dtype, device=x_t.device, generator=generator)
    return mean + var.sqrt() * noise, x0_hat


__all__ = ["ddpm_step", "posterior_mean_var", "predict_x0", "q_sample"]
