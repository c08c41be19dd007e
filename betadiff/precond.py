"""The one bridge between a backbone (`net(x, c)`, knows nothing of diffusion) and the processes (spec §6).

`BetaPrecond(logit_zt, t) -> x0_hat` in [shift, shift + scale]; `GaussianPrecond(x_t, t) -> eps_hat`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import process


def _logit(a: torch.Tensor) -> torch.Tensor:
    a = a.double()
    return torch.log(a) - torch.log1p(-a)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1)))


class BetaPrecond(nn.Module):
    """x̂0 = scale·σ(out) + shift.

    mode="toy":   out = net(ℓ_t, t) on the raw logit (spec §6, toy).
    mode="image": h = (ℓ_t − m(α_t)) / sd(α_t) with the analytic moments of ℓ_t under x0 ~ U[shift, shift+scale];
                  out = h + net(h, c_noise), c_noise = −logit(α_t)/8 (spec §6, images).
    """

    def __init__(self, net: nn.Module, *, eta: float, scale: float, shift: float,
                 schedule: Callable[[torch.Tensor], torch.Tensor], mode: str = "toy"):
        super().__init__()
        if mode not in ("toy", "image"):
            raise ValueError(f"BetaPrecond mode must be toy or image, got {mode!r}")
        self.net, self.eta, self.scale, self.shift, self.schedule, self.mode = net, eta, scale, shift, schedule, mode

    def forward(self, logit_zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the net may run under bf16 autocast; x̂0 must not: bf16 resolves x0 to ~4e-3, far too coarse at η = 1e4
        if self.mode == "toy":
            out = self.net(logit_zt, t).to(logit_zt.dtype)
        else:
            alpha = self.schedule(t.double())
            m, sd = process.logit_moments_uniform(alpha, self.eta, self.scale, self.shift)
            h = ((logit_zt.double() - _bcast(m, logit_zt)) / _bcast(sd, logit_zt)).to(logit_zt.dtype)
            c_noise = (-_logit(alpha) / 8).to(logit_zt.dtype)
            out = h + self.net(h, c_noise).to(h.dtype)
        with torch.autocast(logit_zt.device.type, enabled=False):
            return self.scale * torch.sigmoid(out) + self.shift


class GaussianPrecond(nn.Module):
    """ε̂ = net(x_t, c) with c = t (toy MLP, which scales t by 1000 in its embedding) or −logit(ᾱ_t)/8 (images)."""

    def __init__(self, net: nn.Module, *, schedule: Callable[[torch.Tensor], torch.Tensor], mode: str = "toy"):
        super().__init__()
        self.net, self.schedule, self.mode = net, schedule, mode

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = t if self.mode == "toy" else (-_logit(self.schedule(t.double())) / 8).to(x_t.dtype)
        return self.net(x_t, c)


def gaussian_affine(data_kind: str) -> tuple[float, float]:
    """Gaussian baseline's data map x0 = a·x + b: raw [0, 1] for synthetic data (spec §8), [-1, 1] for images."""
    return (2.0, -1.0) if data_kind == "image" else (1.0, 0.0)
