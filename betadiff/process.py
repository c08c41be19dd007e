"""Beta diffusion: forward/reverse process, schedules, priors and sampler grids (spec §2-4, §6).

Pure tensor functions, after Zhou et al., "Beta Diffusion" (NeurIPS 2023). Glossary:

    x0        model-space data, x0 = scale x + shift in [shift, shift + scale], 0 < shift, shift + scale < 1
    eta       concentration (> 0); z_t | x0 ~ Beta(eta * alpha_t * x0, eta * (1 - alpha_t * x0))
    alpha_t   schedule value in (0, 1], decreasing in t in [0, 1]; alpha_min = alpha(1)
    delta     alpha_s - alpha_t > 0 for s < t, always formed in float64 (cancellation)
    logit z   the network sees logit z_t = log u - log v, u ~ Gamma(a), v ~ Gamma(b); z_t itself underflows

Map of functions to the spec:
    alpha_sigmoid, logit_alpha_sigmoid, alpha_beta_linear, SCHEDULES,  §4
    make_schedule
    sample_gamma                                                       the one Gamma(conc, rate=1) wrapper
    sample_logit_marginal, sample_transition                           §2
    sample_logit_reverse, logit_demask, sample_logit_prior             §3
    grid_geometric_alpha, grid_uniform_t                               §3
    t_from_alpha                                                       grid helper: inverts a schedule
    logit_moments_uniform                                              §6

Shapes: per-sample scalars (t, alpha) are (B,) or 0-d; data are (B, *D). Device and dtype follow the inputs.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import numpy as np
import torch
from torch import Tensor

# float32 smallest normal: the clamp of spec §2, whatever the working dtype (keeps the input distribution).
TINY = torch.finfo(torch.float32).tiny


def _bcast(alpha: Tensor | float, x: Tensor) -> Tensor:
    """Reshape a per-sample (B,) tensor (or 0-d / float) to broadcast against x: (B, *D) -> (B, 1, ..., 1)."""
    alpha = torch.as_tensor(alpha, device=x.device)
    if alpha.ndim == 0 or alpha.ndim == x.ndim:
        return alpha
    return alpha.reshape(alpha.shape + (1,) * (x.ndim - alpha.ndim))


def _delta64(alpha_s: Tensor | float, alpha_t: Tensor | float) -> Tensor:
    """delta = alpha_s - alpha_t in float64 (spec §4: the difference of two nearby alphas cancels)."""
    return torch.as_tensor(alpha_s).double() - torch.as_tensor(alpha_t).double()


# ------------------------------------------------------------------------------------------------------------
# Schedules (spec §4). t: (B,) in [0, 1] -> alpha: (B,) same dtype/device.


def logit_alpha_sigmoid(t: Tensor, c0: float = 10.0, c1: float = -13.0, p: float = 1.0) -> Tensor:
    """Image schedule in logit form: logit alpha_t = c0 + (c1 - c0) * t^p. t: (B,) in [0, 1]."""
    return c0 + (c1 - c0) * t.pow(p)


def alpha_sigmoid(t: Tensor, c0: float = 10.0, c1: float = -13.0, p: float = 1.0) -> Tensor:
    """Image schedule: alpha_t = sigmoid(c0 + (c1 - c0) t^p); alpha(0.5) ~ 0.18, alpha(1) ~ 2.3e-6."""
    return torch.sigmoid(logit_alpha_sigmoid(t, c0, c1, p))


def alpha_beta_linear(t: Tensor, beta_min: float = 0.1, beta_d: float = 19.9) -> Tensor:
    """Toy (VP-style) schedule: alpha_t = exp(-beta_d t^2 / 2 - beta_min t); alpha(0) = 1, alpha(1) ~ 4e-5."""
    return torch.exp(-0.5 * beta_d * t * t - beta_min * t)


SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": alpha_sigmoid,
    "beta_linear": alpha_beta_linear,
}


def make_schedule(name: str, **params: float) -> Callable[[Tensor], Tensor]:
    """Return alpha(t) for a registered schedule with its parameters bound (functools.partial).

    Raises ValueError for an unknown name or parameter, so a bad config fails before any work starts.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    fn = SCHEDULES[name]
    try:
        inspect.signature(fn).bind(None, **params)
    except TypeError as e:
        raise ValueError(f"schedule {name!r}: bad parameters {sorted(params)}: {e}") from None
    return functools.partial(fn, **params)


def t_from_alpha(schedule: Callable[[Tensor], Tensor], alpha: Tensor, iters: int = 60) -> Tensor:
    """Invert a decreasing schedule by bisection in float64: the t in [0, 1] with schedule(t) = alpha.

    Any registered schedule works (no per-schedule inverse to keep in sync). alpha: (n,) -> t: (n,) float64;
    alpha above schedule(0) gives t = 0, below schedule(1) gives t = 1.
    """
    alpha = alpha.double()
    lo, hi = torch.zeros_like(alpha), torch.ones_like(alpha)
    for _ in range(iters):  # 60 halvings: below float64 resolution of t
        mid = 0.5 * (lo + hi)
        above = schedule(mid) > alpha  # still too early: the solution lies later
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


# ------------------------------------------------------------------------------------------------------------
# Gamma sampling


def _marsaglia_tsang(d: Tensor, c: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One Marsaglia-Tsang proposal per entry: (d v, accepted), d = a - 1/3, c = 1/sqrt(9 d); 1-D tensors."""
    x = torch.randn(d.shape, dtype=d.dtype, device=d.device, generator=generator)
    log_u = torch.rand(d.shape, dtype=d.dtype, device=d.device, generator=generator).log_()
    y = c * x
    w = y * (3.0 + y * (3.0 + y))  # v - 1 with v = (1 + c x)^3, formed without cancellation
    # Test log u < x^2/2 + d (1 - v + log v) written with log1p(w) - w: the naive form loses ~0.1 nats in
    # float32 at a ~ 1e6 (d and d v are both ~1e6). y <= -1 (v <= 0) gives NaN here and is rejected.
    ok = log_u < 0.5 * x * x + d * (torch.log1p(w) - w)
    return d * (1.0 + w), ok


def sample_gamma(concentration: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Gamma(concentration, rate=1) draws, driven by an explicit generator.

    Marsaglia & Tsang (2000), vectorised: one proposal for every entry, then only the rejected ones (~2-5 %)
    are redrawn, so the result is a deterministic function of the generator state. For a < 1 draw
    Gamma(a + 1) and multiply by U^(1/a). concentration: any shape, >= 0 (0 gives 0). Returns the same
    shape, dtype and device; half types are computed in float32. Draws that underflow become 0 (callers
    clamp at TINY, spec §2).
    """
    dtype = concentration.dtype if concentration.dtype in (torch.float32, torch.float64) else torch.float32
    a = concentration.to(dtype).reshape(-1)
    small = a < 1
    d = a + small.to(dtype) - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)
    out, ok = _marsaglia_tsang(d, c, generator)
    todo = (~ok).nonzero().squeeze(1)
    while todo.numel() > 0:
        val, ok = _marsaglia_tsang(d[todo], c[todo], generator)
        out[todo[ok]] = val[ok]
        todo = todo[~ok]
    if bool(small.any()):
        # Boost: Gamma(a) = Gamma(a + 1) U^(1/a); exp(log U / a) underflows to 0 rather than NaN.
        log_u = torch.rand(a.shape, dtype=dtype, device=a.device, generator=generator).log_()
        out = torch.where(small, out * torch.exp(log_u / a), out)
    return out.reshape(concentration.shape).to(concentration.dtype)


def _logit_beta_sample(a: Tensor, b: Tensor, generator: torch.Generator | None) -> Tensor:
    """logit of a Beta(a, b) draw, log max(u, tiny) - log max(v, tiny), u ~ Gamma(a), v ~ Gamma(b) (§2)."""
    # One Gamma call on the stacked concentrations: half the kernel launches of two calls (sampler hot path).
    log_uv = sample_gamma(torch.stack(torch.broadcast_tensors(a, b)), generator).clamp_min_(TINY).log_()
    return log_uv[0] - log_uv[1]


# ------------------------------------------------------------------------------------------------------------
# Forward process (spec §2)


def sample_logit_marginal(
    x0: Tensor, alpha_t: Tensor | float, eta: float, generator: torch.Generator | None = None
) -> Tensor:
    """logit z_t with z_t | x0 ~ Beta(eta alpha_t x0, eta (1 - alpha_t x0)), drawn in logit space (spec §2).

    x0: (B, *D) in (0, 1); alpha_t: (B,) or 0-d in (0, 1]. Returns (B, *D) in x0's dtype. Draws whose Gamma
    underflows are clamped at the float32 smallest normal (the authors' behaviour, which the network sees).
    """
    ax = _bcast(alpha_t, x0).to(x0.dtype) * x0
    return _logit_beta_sample(eta * ax, eta * (1.0 - ax), generator)


def sample_transition(
    z_s: Tensor,
    x0: Tensor,
    alpha_s: Tensor | float,
    alpha_t: Tensor | float,
    eta: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multiplicative forward step z_t = z_s * pi, pi ~ Beta(eta alpha_t x0, eta delta x0) (spec §2).

    z_s, x0: (B, *D); alpha_s > alpha_t: (B,) or 0-d. Returns z_t (B, *D) (z-space, for tests and analysis).
    """
    delta = _bcast(_delta64(alpha_s, alpha_t), x0)
    a = eta * _bcast(alpha_t, x0).to(x0.dtype) * x0
    b = (eta * delta * x0).to(x0.dtype)
    u, v = sample_gamma(a, generator), sample_gamma(b, generator)
    return z_s * (u / (u + v))


# ------------------------------------------------------------------------------------------------------------
# Reverse process and sampler pieces (spec §3)


def sample_logit_reverse(
    logit_zt: Tensor,
    x0_hat: Tensor,
    alpha_s: Tensor | float,
    alpha_t: Tensor | float,
    eta: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One reverse step in logit space (spec §3): z_s = z_t + (1 - z_t) p,
    p ~ Beta(eta delta x0_hat, eta (1 - alpha_s x0_hat)).


    With l = logit z_t and b = logit p: logit z_s = logsumexp(l, b, l + b) (spec §3); z_t is never formed.
    logit_zt, x0_hat: (B, *D); alpha_s > alpha_t: (B,) or 0-d. Returns logit z_s (B, *D).
    """
    delta = _bcast(_delta64(alpha_s, alpha_t), x0_hat)
    a = (eta * delta * x0_hat).to(x0_hat.dtype)
    b_conc = eta * (1.0 - _bcast(alpha_s, x0_hat).to(x0_hat.dtype) * x0_hat)
    return logit_demask(logit_zt, _logit_beta_sample(a, b_conc, generator))


def logit_demask(logit_z: Tensor, logit_p: Tensor) -> Tensor:
    """logit(z + (1 - z) p) from l = logit z and b = logit p: logsumexp(l, b, l + b) (spec §3).

    Exact in logit space for any finite l, b (no z is formed). Shapes broadcast.
    """
    return torch.logaddexp(torch.logaddexp(logit_z, logit_p), logit_z + logit_p)  # stable, 3 fused kernels


def sample_logit_prior(
    shape: tuple[int, ...],
    mu: Tensor | float,
    alpha_min: Tensor | float,
    eta: float,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """logit z_1 with z_1 ~ Beta(eta alpha_min mu, eta (1 - alpha_min mu)) (spec §3).

    shape: (N, *D); mu: model-space prior mean, a float or a tensor broadcastable to shape (per-pixel (*D));
    alpha_min = alpha(1) (0-d). Returns (N, *D) of the given dtype/device.
    """
    mu = torch.as_tensor(mu, dtype=dtype, device=device).expand(shape)
    alpha_min = torch.as_tensor(alpha_min, dtype=dtype, device=device)
    return sample_logit_marginal(mu, alpha_min, eta, generator)


def grid_geometric_alpha(alpha_min: float, n: int) -> Tensor:
    """Image sampler grid, geometric in alpha: alpha_k = alpha_min^(1 - k/n), k = 0..n (spec §3).

    Returns (n + 1,) float64, increasing from alpha_min to exactly 1.
    """
    k = torch.arange(n + 1, dtype=torch.float64)
    return torch.as_tensor(alpha_min, dtype=torch.float64).pow(1.0 - k / n)


def grid_uniform_t(n: int, t_min: float = 1e-5) -> Tensor:
    """Toy sampler grid: t_k = 1 - k/(n - 1) (1 - t_min), k = 0..n-1, then a final t = 0 (spec §3).

    Returns (n + 1,) float64, decreasing from 1 to 0 (n >= 2).
    """
    if n < 2:
        raise ValueError(f"grid_uniform_t needs n >= 2 steps, got {n}")
    k = torch.arange(n, dtype=torch.float64)
    ts = 1.0 - k / (n - 1) * (1.0 - t_min)
    return torch.cat([ts, ts.new_zeros(1)])


# ------------------------------------------------------------------------------------------------------------
# Analytic moments of logit z_t for x0 ~ Uniform[shift, shift + scale] (spec §6, input normalisation)


@functools.lru_cache(maxsize=4)
def _gauss_legendre01(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1] (weights sum to 1)."""
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (x + 1.0), 0.5 * w


def logit_moments_uniform(
    alpha: Tensor, eta: float, scale: float, shift: float, exact: bool = False, nodes: int = 64
) -> tuple[Tensor, Tensor]:
    """Mean and sd of logit z_t when x0 ~ Uniform[shift, shift + scale] and z_t | x0 ~ Beta(A x0, eta - A x0).

    With A = eta alpha, E[logit z | x0] = psi(A x0) - psi(eta - A x0), Var = psi'(A x0) + psi'(eta - A x0):
      m  = E1 - E2, E1 = [lnG(A x_max) - lnG(A x_min)]/(A scale),
                    E2 = [lnG(eta - A x_min) - lnG(eta - A x_max)]/(A scale)
      V1, V2: the same with psi for lnG (the means of psi'); V3, V4: Var_x psi(A x), Var_x psi(eta - A x)
      sd = sqrt(V1 + V2 + V3 + V4)   (spec §6, the authors' formula; omits -2 Cov(psi(A x), psi(eta - A x)));
      exact=True adds that covariance term (the true sd).
    V3, V4 and the covariance use a fixed Gauss-Legendre rule in float64.
    alpha: (B,) in (0, 1]; needs shift > 0.
    Returns (mean, sd), each (B,) in alpha's dtype/device.
    """
    a64 = alpha.double()
    A = (eta * a64).unsqueeze(-1)  # (B, 1)
    x_min, x_max = shift, shift + scale
    width = A * scale
    e1 = (torch.lgamma(A * x_max) - torch.lgamma(A * x_min)) / width
    e2 = (torch.lgamma(eta - A * x_min) - torch.lgamma(eta - A * x_max)) / width
    v1 = (torch.digamma(A * x_max) - torch.digamma(A * x_min)) / width
    v2 = (torch.digamma(eta - A * x_min) - torch.digamma(eta - A * x_max)) / width
    u, w = (torch.as_tensor(v, dtype=torch.float64, device=alpha.device) for v in _gauss_legendre01(nodes))
    x = shift + scale * u  # (nodes,)
    psi_a = torch.digamma(A * x)  # (B, nodes)
    psi_b = torch.digamma(eta - A * x)
    # Centre by the closed-form means so the quadrature variance does not cancel.
    v3 = ((psi_a - e1) ** 2 * w).sum(-1, keepdim=True)
    v4 = ((psi_b - e2) ** 2 * w).sum(-1, keepdim=True)
    var = v1 + v2 + v3 + v4
    if exact:
        var = var - 2.0 * ((psi_a - e1) * (psi_b - e2) * w).sum(-1, keepdim=True)
    mean, sd = (e1 - e2).squeeze(-1), var.sqrt().squeeze(-1)
    return mean.to(alpha.dtype), sd.to(alpha.dtype)


__all__ = [
    "SCHEDULES",
    "TINY",
    "alpha_beta_linear",
    "alpha_sigmoid",
    "grid_geometric_alpha",
    "grid_uniform_t",
    "logit_alpha_sigmoid",
    "logit_demask",
    "logit_moments_uniform",
    "make_schedule",
    "sample_gamma",
    "sample_logit_marginal",
    "sample_logit_prior",
    "sample_logit_reverse",
    "sample_transition",
    "t_from_alpha",
]
