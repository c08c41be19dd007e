"""Samplers (spec §3, §8) with oracle denoisers: constant x0_hat (analytic Beta chain), posterior means."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from betadiff.process import make_schedule
from betadiff.sampling import GEOMETRIC_MAX_STEPS, make_grid, sample_beta, sample_gaussian

ETA = 1e4


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def const(c):
    return lambda logit_zt, t: torch.full_like(logit_zt, c)


def assert_beta(z: np.ndarray, a: float, b: float, ks: bool = True):
    """z ~ Beta(a, b): mean and variance within 5 SE, and (optionally) a KS test."""
    n, m, v = z.size, a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert abs(z.mean() - m) < 5 * math.sqrt(v / n), (z.mean(), m)
    se_v = math.sqrt(max(((z - z.mean()) ** 4).mean() - z.var() ** 2, 0) / n)
    assert abs(z.var() - v) < 5 * se_v, (z.var(), v)
    if ks:
        assert stats.kstest(z, stats.beta(a, b).cdf).pvalue > 1e-4


@pytest.mark.parametrize(
    "sched,grid,scale,shift,c",
    [("beta_linear", "uniform_t", 1.0, 0.0, 0.7), ("sigmoid", "geometric_alpha", 0.39, 0.6, 0.8)],
)
def test_constant_denoiser_follows_analytic_beta_chain(sched, grid, scale, shift, c):
    # x0_hat == c and prior mean c: every z_k is exactly Beta(eta alpha_k c, eta (1 - alpha_k c)),
    # so z_0 ~ Beta(eta c, eta (1 - c))
    n, steps = 10_000, 200
    schedule = make_schedule(sched)
    out = sample_beta(
        const(c),
        (n, 1),
        eta=ETA,
        scale=scale,
        shift=shift,
        schedule=schedule,
        mu=(c - shift) / scale,
        steps=steps,
        grid=grid,
        generator=gen(1),
        dtype=torch.float64,
        return_trajectory=True,
    )
    traj = out["trajectory"]
    assert traj["logit_z"].shape == (steps + 1, n, 1) and traj["x0_hat"].shape == (steps, n, 1)
    assert torch.equal(out["x0_hat"], torch.full((n, 1), c, dtype=torch.float64))
    alphas = traj["alpha"]
    # skip grid points where eta alpha c < 1 (image prior: draws sit on the float32 floor, spec §2)
    for k in [k for k in (0, 50, 120, 180, steps - 1) if ETA * alphas[k] * c > 1]:
        a = (ETA * alphas[k] * c).item()
        assert_beta(torch.sigmoid(traj["logit_z"][k]).numpy().ravel(), a, ETA - a, ks=(k % 2 == 0))
    assert (
        alphas[-1].item() == 1.0
    )  # both grids end at alpha = 1 here, so z0 = z_N ~ Beta(eta c, eta (1 - c))
    assert torch.equal(out["z0"], torch.sigmoid(traj["logit_z"][-1]))
    assert_beta(out["z0"].numpy().ravel(), ETA * c, ETA * (1 - c))


def _two_point_beta_denoiser(points, weights, eta, schedule):
    """Exact E[x0 | logit z_t] for a discrete prior: the Beta likelihood in logit space (Jacobian cancels)."""
    pts = torch.tensor(points, dtype=torch.float64)
    logw = torch.tensor(weights, dtype=torch.float64).log()

    def denoiser(logit_zt, t):
        a = eta * schedule(t.double())[:, None, None] * pts  # (B, 1, K)
        b = eta - a
        ell = logit_zt.double()[..., None]  # (B, D, 1)
        loglik = (
            a * torch.nn.functional.logsigmoid(ell)
            + b * torch.nn.functional.logsigmoid(-ell)
            - (torch.lgamma(a) + torch.lgamma(b) - math.lgamma(eta))
        )
        post = torch.softmax(loglik + logw, dim=-1)
        return (post * pts).sum(-1).to(logit_zt.dtype)

    return denoiser


def test_beta_sampler_with_exact_posterior_mean_recovers_point_masses():
    n, points = 10_000, (0.3, 0.6)
    schedule = make_schedule("beta_linear")
    den = _two_point_beta_denoiser(points, (0.5, 0.5), ETA, schedule)
    x = sample_beta(den, (n, 1), eta=ETA, scale=1.0, shift=0.0, schedule=schedule, mu=0.5, generator=gen(2))[
        "x0_hat"
    ]
    x = x.numpy().ravel()
    near = [np.abs(x - p) < 1e-3 for p in points]
    assert (near[0] | near[1]).mean() > 0.995  # mass exactly on the points, nothing in between
    print("beta two-point share", near[0].mean())
    assert abs(near[0].mean() - 0.5) < 0.04, near[0].mean()


def test_gaussian_sampler_point_mass_and_two_points():
    schedule = make_schedule("beta_linear")
    n, c = 5_000, 0.3

    def exact_eps(x_t, t):  # point mass at c: eps = (x_t - sqrt(ab) c) / sqrt(1 - ab)
        ab = schedule(t.double())[:, None].to(x_t.dtype)
        return (x_t - ab.sqrt() * c) / (1 - ab).sqrt()

    out = sample_gaussian(exact_eps, (n, 2), schedule=schedule, generator=gen(3))
    assert out["x0"].shape == (n, 2) and out["x0_hat"].dtype == torch.float32
    assert (out["x0"] - c).abs().max().item() < 1e-4
    assert (out["x0_hat"] - c).abs().max().item() < 1e-4

    pts = torch.tensor([0.2, 0.7], dtype=torch.float64)

    def two_point_eps(x_t, t):  # E[x0 | x_t] under the Gaussian likelihood, then eps from it
        ab = schedule(t.double())[:, None, None]
        xt = x_t.double()[..., None]
        logits = -((xt - ab.sqrt() * pts) ** 2) / (2 * (1 - ab))
        mean = (torch.softmax(logits, -1) * pts).sum(-1)
        return ((x_t.double() - ab[..., 0].sqrt() * mean) / (1 - ab[..., 0]).sqrt()).to(x_t.dtype)

    x = sample_gaussian(two_point_eps, (10_000, 1), schedule=schedule, generator=gen(4))["x0"].numpy().ravel()
    near = [np.abs(x - p) < 0.02 for p in (0.2, 0.7)]
    assert (near[0] | near[1]).mean() > 0.99
    print("gauss two-point share", near[0].mean())
    assert abs(near[0].mean() - 0.5) < 0.04


def test_determinism_chunking_callback_and_shapes():
    schedule = make_schedule("sigmoid")
    kw = dict(
        eta=ETA,
        scale=0.39,
        shift=0.6,
        schedule=schedule,
        mu=torch.full((2, 3), 0.4),
        steps=20,
        grid="geometric_alpha",
    )
    den = lambda logit_zt, t: 0.6 + 0.39 * torch.sigmoid(0.01 * logit_zt + t[:, None, None])
    a, b = (
        sample_beta(den, (10, 2, 3), generator=gen(5), **kw),
        sample_beta(den, (10, 2, 3), generator=gen(5), **kw),
    )
    assert torch.equal(a["x0_hat"], b["x0_hat"]) and torch.equal(a["z0"], b["z0"])
    assert a["x0_hat"].shape == (10, 2, 3) and a["x0_hat"].dtype == torch.float32
    assert not torch.equal(a["z0"], sample_beta(den, (10, 2, 3), generator=gen(6), **kw)["z0"])
    seen = []
    c = sample_beta(
        den, (10, 2, 3), generator=gen(5), batch_size=4, callback=seen.append, return_trajectory=True, **kw
    )
    assert c["x0_hat"].shape == (10, 2, 3) and c["trajectory"]["logit_z"].shape == (21, 10, 2, 3)
    assert len(seen) == 3 * 20 and [s["chunk"] for s in seen[::20]] == [0, 1, 2]
    assert seen[0]["alpha_s"] > seen[0]["alpha_t"] and seen[0]["t"] == 1.0
    assert torch.equal(sample_beta(den, (10, 2, 3), generator=gen(5), batch_size=10, **kw)["z0"], a["z0"])

    g1 = sample_gaussian(lambda x, t: 0.1 * x, (7, 3), schedule=schedule, steps=10, generator=gen(7))
    g2 = sample_gaussian(lambda x, t: 0.1 * x, (7, 3), schedule=schedule, steps=10, generator=gen(7))
    assert torch.equal(g1["x0"], g2["x0"])


def test_grid_selection():
    schedule = make_schedule("sigmoid")
    ts, al = make_grid(schedule, 200, "geometric_alpha")
    assert ts.shape == al.shape == (201,) and ts[0] == 1.0 and ts[-1] == 0.0 and al[-1] == 1.0
    assert bool((ts[1:] < ts[:-1]).all()) and bool((al[1:] > al[:-1]).all())
    assert torch.allclose(schedule(ts[:-1]), al[:-1], rtol=1e-9)  # t_k inverts the schedule
    ts2, al2 = make_grid(schedule, GEOMETRIC_MAX_STEPS + 50, "geometric_alpha")  # authors switch to uniform t
    assert ts2[-2].item() == pytest.approx(1e-5) and torch.allclose(al2, schedule(ts2))
    with pytest.raises(ValueError, match="grid"):
        make_grid(schedule, 10, "karras")
