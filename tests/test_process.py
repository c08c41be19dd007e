"""Beta process (spec §2-4, §6) vs independent oracles: scipy distributions, Monte Carlo, quadrature."""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from betadiff.process import (
    SCHEDULES,
    TINY,
    alpha_beta_linear,
    alpha_sigmoid,
    grid_geometric_alpha,
    grid_uniform_t,
    logit_alpha_sigmoid,
    logit_demask,
    logit_moments_uniform,
    make_schedule,
    sample_gamma,
    sample_logit_marginal,
    sample_logit_prior,
    sample_logit_reverse,
    sample_transition,
    t_from_alpha,
)

ETA = 1e4


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_moments(z: np.ndarray, mean: float, var: float, z_tol: float = 5.0):
    """Sample mean/variance within z_tol standard errors (SE of the variance from the sample's 4th moment)."""
    n = z.size
    m, v = z.mean(), z.var()
    se_m = math.sqrt(var / n)
    se_v = math.sqrt(max(((z - m) ** 4).mean() - v**2, 0.0) / n)
    assert abs(m - mean) < z_tol * se_m, (m, mean, se_m)
    assert abs(v - var) < z_tol * se_v, (v, var, se_v)


# ---- schedules, grids


def test_schedules_match_spec_values():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    a = alpha_sigmoid(t)
    assert a[1].item() == pytest.approx(special.expit(-1.5), rel=1e-12)  # ~0.18
    assert a[2].item() == pytest.approx(special.expit(-13.0), rel=1e-12)  # ~2.3e-6
    assert torch.allclose(logit_alpha_sigmoid(t, 10.0, -13.0, 1.0), torch.logit(a))
    b = alpha_beta_linear(t)
    assert b[0].item() == 1.0
    assert b[2].item() == pytest.approx(math.exp(-0.5 * 19.9 - 0.1), rel=1e-12)
    assert set(SCHEDULES) == {"sigmoid", "beta_linear"}
    f = make_schedule("sigmoid", c0=9.0, c1=-12.0, p=2.0)
    assert f(t)[1].item() == pytest.approx(special.expit(9.0 - 21.0 * 0.25), rel=1e-12)
    assert make_schedule("beta_linear")(t.float()).dtype == torch.float32


@pytest.mark.parametrize("name,params", [("cosine", {}), ("sigmoid", {"beta_min": 0.1})])
def test_make_schedule_rejects_bad_input(name, params):
    with pytest.raises(ValueError, match=name if name == "cosine" else "beta_min"):
        make_schedule(name, **params)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_t_from_alpha_inverts_schedule(name):
    sched = make_schedule(name)
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    t_back = t_from_alpha(sched, sched(t))
    assert torch.allclose(sched(t_back), sched(t), rtol=1e-10, atol=0)


def test_grids():
    alpha_min = float(alpha_sigmoid(torch.tensor(1.0, dtype=torch.float64)))
    a = grid_geometric_alpha(alpha_min, 200)
    assert a.shape == (201,) and a.dtype == torch.float64
    assert a[0].item() == pytest.approx(alpha_min, rel=1e-14) and a[-1].item() == 1.0
    assert bool((a[1:] > a[:-1]).all())
    ratios = a[1:] / a[:-1]  # geometric: constant ratio alpha_min^(-1/N)
    assert torch.allclose(ratios, torch.full_like(ratios, alpha_min ** (-1 / 200)), rtol=1e-12)

    t = grid_uniform_t(200)
    assert t.shape == (201,)
    assert t[0].item() == 1.0 and t[-2].item() == pytest.approx(1e-5, abs=1e-15) and t[-1].item() == 0.0
    assert bool((t[1:] < t[:-1]).all())
    assert torch.allclose(t[1:-1] - t[:-2], torch.full((199,), -(1 - 1e-5) / 199, dtype=torch.float64))
    with pytest.raises(ValueError):
        grid_uniform_t(1)


# ---- Gamma sampler


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a", [0.01, 0.3, 1.0, 3.7, 1e3, 1e6])
def test_gamma_moments_and_ks(a, dtype):
    n = 60_000
    x = sample_gamma(torch.full((n,), a, dtype=dtype), generator=gen(1))
    assert x.dtype == dtype and x.shape == (n,)
    xs = x.double().numpy()
    # mean/var vs scipy; variance SE from the Gamma 4th central moment 3a^2 + 6a
    m, v = stats.gamma.stats(a, moments="mv")
    assert abs(xs.mean() - m) < 5 * math.sqrt(v / n)
    assert abs(xs.var() - v) < 5 * math.sqrt((3 * a * a + 6 * a - a * a) / n)
    # KS above the float32 floor (float32 draws of Gamma(0.01) underflow ~40 % of the time, as torch's do),
    # and a binomial check of the share below it
    F = stats.gamma(a).cdf
    p_low, below = F(TINY), xs < TINY
    assert abs(below.mean() - p_low) <= 5 * math.sqrt(p_low * (1 - p_low) / n) + 1.0 / n
    ks = stats.kstest(xs[~below], lambda x: (F(x) - p_low) / (1 - p_low))
    assert ks.pvalue > 1e-4, ks


def test_gamma_mixed_shapes_and_determinism():
    conc = torch.tensor([[0.0, 0.05], [2.0, 5e4]]).expand(3, 2, 2)
    x1, x2 = sample_gamma(conc, gen(7)), sample_gamma(conc, gen(7))
    assert x1.shape == conc.shape and torch.equal(x1, x2)
    assert bool((x1[:, 0, 0] == 0).all())  # Gamma(0) is the point mass at 0
    assert not torch.equal(x1, sample_gamma(conc, gen(8)))
    assert sample_gamma(conc.half(), gen(7)).dtype == torch.float16


# ---- forward process


@pytest.mark.parametrize("alpha", [0.9, 0.1, 1e-3])
def test_marginal_moments(alpha):
    n = 40_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    ell = sample_logit_marginal(x0, torch.full((n,), alpha, dtype=torch.float64), ETA, gen(2))
    z = torch.sigmoid(ell).numpy().ravel()
    m = alpha * 0.7
    assert_moments(z, m, m * (1 - m) / (ETA + 1))
    ks = stats.kstest(z, stats.beta(ETA * m, ETA * (1 - m)).cdf)
    assert ks.pvalue > 1e-4


def test_marginal_keeps_float32_floor():
    # Image prior regime: alpha(1) ~ 2.3e-6, so Gamma(eta alpha x0) underflows float32 for ~30 % of draws.
    # Spec §2: those draws are clamped at the float32 smallest normal (also when computing in float64).
    n, alpha, x0v = 50_000, 2.26e-6, 0.6
    a = ETA * alpha * x0v
    for dtype in (torch.float32, torch.float64):
        ell = sample_logit_marginal(torch.full((n,), x0v, dtype=dtype), torch.tensor(alpha), ETA, gen(3))
        assert bool(torch.isfinite(ell).all())
        floor = math.log(TINY) - math.log(ETA)  # log tiny - log v, v ~ Gamma(eta - a) = eta (1 +- 0.01)
        assert ell.min().item() > floor - 0.05
        share = ((ell - floor).abs() < 0.05).double().mean().item()
        p_clamp = special.gammainc(a, TINY)  # P(u < tiny)
        assert abs(share - p_clamp) < 5 * math.sqrt(p_clamp * (1 - p_clamp) / n), (share, p_clamp)


def test_transition_reproduces_marginal():
    n, x0v, a_s, a_t = 40_000, 0.55, 0.4, 0.25
    x0 = torch.full((n,), x0v, dtype=torch.float64)
    z_s = torch.sigmoid(sample_logit_marginal(x0, torch.tensor(a_s), ETA, gen(4)))
    z_t = sample_transition(z_s, x0, torch.tensor(a_s), torch.tensor(a_t), ETA, gen(5)).numpy()
    m = a_t * x0v
    assert_moments(z_t, m, m * (1 - m) / (ETA + 1))
    assert stats.kstest(z_t, stats.beta(ETA * m, ETA * (1 - m)).cdf).pvalue > 1e-4


@pytest.mark.parametrize("a_s,a_t", [(0.5, 0.3), (0.02, 0.015), (1.0, 0.999)])
def test_reverse_conditional_gives_marginal_at_s(a_s, a_t):
    # z_t ~ q(z_t | x0), z_s ~ q(z_s | z_t, x0)  =>  z_s ~ Beta(eta alpha_s x0, eta (1 - alpha_s x0))
    n, x0v = 40_000, 0.8
    x0 = torch.full((n, 1), x0v, dtype=torch.float64)
    ell_t = sample_logit_marginal(x0, torch.tensor(a_t, dtype=torch.float64), ETA, gen(6))
    ell_s = sample_logit_reverse(ell_t, x0, torch.tensor(a_s), torch.tensor(a_t), ETA, gen(7))
    z_s = torch.sigmoid(ell_s).numpy().ravel()
    m = a_s * x0v
    assert_moments(z_s, m, m * (1 - m) / (ETA + 1))
    assert stats.kstest(z_s, stats.beta(ETA * m, ETA * (1 - m)).cdf).pvalue > 1e-4


def test_logit_demask_identity():
    rng = np.random.default_rng(0)
    ell, b = rng.uniform(-30, 30, 10_000), rng.uniform(-30, 30, 10_000)
    z, p = special.expit(ell), special.expit(b)
    # oracle without cancellation near z = 1: 1 - z_s = (1 - z)(1 - p) (spec §3)
    expect = np.log(z + (1 - z) * p) - special.log_expit(-ell) - special.log_expit(-b)
    got = logit_demask(torch.from_numpy(ell), torch.from_numpy(b)).numpy()
    assert np.allclose(got, expect, rtol=1e-9, atol=1e-9)
    # far tails, where z and p underflow (logit ~ -200): compare with 50-digit arithmetic
    import mpmath

    mpmath.mp.dps = 50
    for lv, bv in [(-200.0, -210.0), (-90.0, -90.0), (-500.0, 3.0), (40.0, -300.0)]:
        zz, pp = mpmath.mpf(1) / (1 + mpmath.exp(-lv)), mpmath.mpf(1) / (1 + mpmath.exp(-bv))
        s = zz + (1 - zz) * pp
        ref = float(mpmath.log(s) - mpmath.log(1 - s))
        got = logit_demask(
            torch.tensor(lv, dtype=torch.float64), torch.tensor(bv, dtype=torch.float64)
        ).item()
        assert got == pytest.approx(ref, rel=1e-12)
    # float32 at the clamp floor stays finite
    out = logit_demask(torch.tensor([-96.0, -96.0]), torch.tensor([-96.0, 5.0]))
    assert bool(torch.isfinite(out).all())


def test_same_seed_same_samples_and_dtype_follow():
    x0 = torch.rand(64, 3, generator=gen(0)) * 0.39 + 0.6
    alpha = torch.rand(64, generator=gen(1))
    l1 = sample_logit_marginal(x0, alpha, ETA, gen(9))
    l2 = sample_logit_marginal(x0, alpha, ETA, gen(9))
    assert torch.equal(l1, l2) and l1.dtype == torch.float32 and l1.shape == x0.shape
    r1 = sample_logit_reverse(l1, x0, alpha.double() * 0 + 1.0, alpha, ETA, gen(10))
    r2 = sample_logit_reverse(l1, x0, alpha.double() * 0 + 1.0, alpha, ETA, gen(10))
    assert torch.equal(r1, r2) and r1.dtype == torch.float32
    assert not torch.equal(l1, sample_logit_marginal(x0, alpha, ETA, gen(11)))
    l64 = sample_logit_marginal(x0.double(), alpha, ETA, gen(9))
    assert l64.dtype == torch.float64


def test_prior():
    n = 40_000
    mu = torch.tensor([0.62, 0.9])  # per-pixel model-space means, (*D)
    ell = sample_logit_prior((n, 2), mu, 0.05, ETA, gen(12), dtype=torch.float64)
    assert ell.shape == (n, 2) and ell.dtype == torch.float64
    z = torch.sigmoid(ell).numpy()
    for j in range(2):
        m = 0.05 * mu[j].item()
        assert_moments(z[:, j], m, m * (1 - m) / (ETA + 1))


# ---- analytic moments


@pytest.mark.parametrize("alpha", [1e-4, 0.01, 0.18, 0.95])
def test_logit_moments_uniform_vs_monte_carlo(alpha):
    # alpha >= 1e-4 keeps eta alpha x0 >= 0.6, so no draw hits the float32 floor (the analytic moments are
    # those of the unclamped logit).
    n, scale, shift = 200_000, 0.39, 0.6
    g = gen(13)
    x0 = shift + scale * torch.rand(n, dtype=torch.float64, generator=g)
    ell = sample_logit_marginal(x0, torch.tensor(alpha, dtype=torch.float64), ETA, g).numpy()
    a = torch.tensor([alpha], dtype=torch.float64)
    mean, sd_authors = (v.item() for v in logit_moments_uniform(a, ETA, scale, shift))
    _, sd_exact = (v.item() for v in logit_moments_uniform(a, ETA, scale, shift, exact=True))
    mc_mean, mc_sd = ell.mean(), ell.std()
    assert abs(mc_mean - mean) < 5 * mc_sd / math.sqrt(n)
    se_sd = math.sqrt(max(((ell - mc_mean) ** 4).mean() - mc_sd**4, 0) / n) / (2 * mc_sd)
    assert abs(mc_sd - sd_exact) < 5 * se_sd
    assert sd_authors <= sd_exact + 1e-12  # the omitted -2 Cov term is >= 0 (psi(Ax) up, psi(eta - Ax) down)


def _moments_by_quad(A, eta, scale, shift):
    """(mean, authors' variance, exact variance) of logit z_t, x0 ~ U[shift, shift + scale], by quad."""
    from scipy.integrate import quad

    def avg(f):
        return quad(f, shift, shift + scale, epsabs=0, epsrel=1e-13, limit=200)[0] / scale

    psi_a = lambda x: special.digamma(A * x)
    psi_b = lambda x: special.digamma(eta - A * x)
    mean = avg(lambda x: psi_a(x) - psi_b(x))
    var_cond = avg(lambda x: special.polygamma(1, A * x) + special.polygamma(1, eta - A * x))
    va = avg(lambda x: psi_a(x) ** 2) - avg(psi_a) ** 2
    vb = avg(lambda x: psi_b(x) ** 2) - avg(psi_b) ** 2
    exact = avg(lambda x: (psi_a(x) - psi_b(x) - mean) ** 2) + var_cond
    return mean, var_cond + va + vb, exact


def test_logit_moments_uniform_closed_forms_vs_quad():
    # E1..V4 of spec §6 against scipy quadrature of psi / psi' over the range, including the covariance term.
    eta, scale, shift = ETA, 0.39, 0.6
    alphas = torch.tensor([2.3e-6, 0.003, 0.5, 1.0], dtype=torch.float64)
    mean, sd = logit_moments_uniform(alphas, eta, scale, shift)
    _, sd_x = logit_moments_uniform(alphas, eta, scale, shift, exact=True)
    for i, al in enumerate(alphas.tolist()):
        m_ref, var_authors, var_exact = _moments_by_quad(eta * al, eta, scale, shift)
        assert mean[i].item() == pytest.approx(m_ref, rel=1e-9, abs=1e-9)
        assert sd[i].item() == pytest.approx(math.sqrt(var_authors), rel=1e-7)
        assert sd_x[i].item() == pytest.approx(math.sqrt(var_exact), rel=1e-7)
    assert logit_moments_uniform(alphas.float(), eta, scale, shift)[0].dtype == torch.float32
