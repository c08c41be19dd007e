"""Losses (spec §5, §8) vs scipy quadrature, mpmath, the Bregman facts of spec §5 and Monte Carlo."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, special

from betadiff.losses import (
    BETA_LOSSES,
    GAUSSIAN_LOSSES,
    LOSSES,
    beta_loss,
    elbo_cond,
    elbo_marg,
    gauss_klub,
    gaussian_loss,
    kl_beta,
    klub_cond,
    klub_marg,
)
from betadiff.process import make_schedule

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def kl_beta_quad(a1, b1, a2, b2):
    """KL(Beta(a1,b1) || Beta(a2,b2)) by scipy quad over u = logit x (KL is parametrisation-invariant), with
    log densities a log sigmoid(u) + b log sigmoid(-u) - ln B(a, b) so nothing under- or overflows."""

    def logp(u, a, b):
        return a * special.log_expit(u) + b * special.log_expit(-u) - special.betaln(a, b)

    def f(u):
        lp = logp(u, a1, b1)
        return math.exp(lp) * (lp - logp(u, a2, b2))

    centre = special.digamma(a1) - special.digamma(b1)  # mean and sd of logit x under p
    sd = math.sqrt(special.polygamma(1, a1) + special.polygamma(1, b1))
    knots = centre + sd * np.array([-60, -30, -15, -8, -4, -2, -1, 0, 1, 2, 4, 8, 15, 30, 60])
    edges = [-np.inf, *knots, np.inf]
    return sum(
        integrate.quad(f, lo, hi, epsabs=1e-15, epsrel=1e-12, limit=400)[0]
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    )


# ---- kl_beta

KL_CASES = [
    (0.5, 0.5, 2.0, 3.0),
    (0.01, 1.0, 0.02, 1.5),  # a ~ 1e-2: mass piles up near 0
    (0.0138, 9999.99, 0.0139, 9999.99),  # image prior regime, eta alpha(1) x0
    (1e-2, 1e6, 1.1e-2, 1e6),
    (6000.0, 4000.0, 6010.0, 3990.0),  # eta = 1e4, a converged model
    (7000.0, 3000.0, 7000.7, 2999.3),  # nearly identical Betas (spec: float32 gives 0.0039 here)
    (1e6, 1e6, 1.001e6, 0.999e6),
    (9.9e5, 1e4, 9.901e5, 0.99e4),  # x0 at the top of the range, eta = 1e6
    (3.0, 1e6, 2.0, 1e6),
]


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize("a1,b1,a2,b2", KL_CASES)
def test_kl_beta_vs_quad(a1, b1, a2, b2):
    args = [torch.tensor(v, dtype=F64) for v in (a1, b1, a2, b2)]
    ref = kl_beta_quad(a1, b1, a2, b2)
    got = kl_beta(*args, precise=True).item()
    assert got == pytest.approx(ref, rel=1e-7, abs=1e-11), (got, ref)
    plain = kl_beta(*args).item()  # the training form: absolute accuracy far below any loss value
    assert plain == pytest.approx(ref, rel=1e-5, abs=1e-8), (plain, ref)


@pytest.mark.parametrize("eta", [1e2, 1e4, 1e6])
def test_kl_beta_nearly_identical_vs_mpmath(eta):
    # converged-model regime: relative parameter changes 1e-3 .. 1e-9, where lgamma differences cancel
    import mpmath

    mpmath.mp.dps = 40

    def kl_mp(a1, b1, a2, b2):
        K = lambda a, b: (a - b) * mpmath.digamma(a) - mpmath.loggamma(a) + mpmath.loggamma(b)
        a1, b1, a2, b2 = (mpmath.mpf(v) for v in (a1, b1, a2, b2))
        return float(K(a1, a2) + K(b1, b2) - K(a1 + b1, a2 + b2))

    for x0 in (0.6, 0.99):
        for rel in (1e-3, 1e-6, 1e-9):
            x1 = x0 * (1 - rel)
            params = (eta * x1, eta * (1 - x1), eta * x0, eta * (1 - x0))
            got = kl_beta(*(torch.tensor(v, dtype=F64) for v in params), precise=True).item()
            plain = kl_beta(*(torch.tensor(v, dtype=F64) for v in params)).item()
            assert plain == pytest.approx(kl_mp(*params), abs=2e-8)  # the training form: absolute error only
            # relative 1e-6, or ~1e-15 absolute where a parameter is O(1) and the KL itself is ~1e-17
            assert got == pytest.approx(kl_mp(*params), rel=1e-6, abs=1e-15)


def test_kl_beta_nonnegative_zero_at_identity_float64():
    g = gen(0)
    a1, b1, a2, b2 = (
        10 ** (8 * torch.rand(20_000, dtype=F64, generator=g) - 2) for _ in range(4)
    )  # 1e-2..1e6
    kl = kl_beta(a1, b1, a2, b2)
    assert kl.dtype == F64 and bool(torch.isfinite(kl).all())
    assert kl.min().item() >= 0.0
    # nearby pairs (relative change 1e-6), where the naive lgamma form goes negative by ~1e-9 at 1e6
    near = kl_beta(a1, b1, a1 * (1 + 1e-6), b1 * (1 - 1e-6), precise=True)
    assert near.min().item() >= 0.0
    assert kl_beta(a1, b1, a1 * (1 + 1e-6), b1 * (1 - 1e-6)).min().item() >= -1e-8
    assert torch.equal(kl_beta(a1, b1, a1, b1), torch.zeros_like(a1))  # exactly 0
    # float32 inputs are promoted: the KL is always float64
    assert kl_beta(a1.float(), b1.float(), a2.float(), b2.float()).dtype == F64


# ---- Bregman facts


def _phi(x, a_lo, a_hi, eta):
    """phi(x) = ln B(eta a_lo x, eta (1 - a_hi x)) and phi'(x), in 40-digit arithmetic (mpmath)."""
    import mpmath

    mpmath.mp.dps = 40
    x, a_lo, a_hi, eta = (mpmath.mpf(float(v)) for v in (x, a_lo, a_hi, eta))
    p, q = eta * a_lo * x, eta * (1 - a_hi * x)
    val = mpmath.loggamma(p) + mpmath.loggamma(q) - mpmath.loggamma(p + q)
    d = (
        eta * a_lo * mpmath.digamma(p)
        - eta * a_hi * mpmath.digamma(q)
        - (eta * a_lo - eta * a_hi) * mpmath.digamma(p + q)
    )
    return val, d


@pytest.mark.parametrize("eta", [1e2, 1e4, 1e6])
def test_klub_terms_are_bregman_divergences(eta):
    a_s, a_t = 0.02, 0.015
    x0, x0_hat = [0.62, 0.95, 0.7], [0.785, 0.7, 0.7001]
    args = (
        torch.tensor(x0_hat, dtype=F64)[:, None],
        torch.tensor(x0, dtype=F64)[:, None],
        torch.tensor(a_s, dtype=F64),
        torch.tensor(a_t, dtype=F64),
        eta,
    )

    def check(got, xs, ys, a_lo, a_hi):  # got == D_phi(x, y) = phi(x) - phi(y) - phi'(y)(x - y)
        for g, x, y in zip(got.tolist(), xs, ys, strict=True):
            (px, _), (py, dy) = _phi(x, a_lo, a_hi, eta), _phi(y, a_lo, a_hi, eta)
            assert g == pytest.approx(float(px - py - dy * (x - y)), rel=1e-8, abs=5e-9)  # plain form: ~1e-9 at eta=1e6

    delta = a_s - a_t
    check(klub_cond(*args), x0, x0_hat, delta, a_s)
    check(klub_marg(*args), x0, x0_hat, a_t, a_t)
    check(elbo_cond(*args), x0_hat, x0, delta, a_s)
    check(elbo_marg(*args), x0_hat, x0, a_t, a_t)


def test_spec_example_klub_argmin_is_posterior_mean_elbo_is_biased():
    # spec §5: eta = 1e4, alpha_s = 0.02, alpha_t = 0.015, posterior uniform on {0.62, 0.95}
    eta, a_s, a_t = 1e4, torch.tensor(0.02, dtype=F64), torch.tensor(0.015, dtype=F64)
    pts = torch.tensor([[0.62], [0.95]], dtype=F64)

    def argmin(name, omega):
        def risk(v):
            x0_hat = torch.full_like(pts, v)
            return BETA_LOSSES[name](x0_hat, pts, a_s, a_t, eta, omega)[0].mean().item()

        return optimize.minimize_scalar(
            risk, bounds=(0.62, 0.95), method="bounded", options={"xatol": 1e-9}
        ).x

    for omega in (0.0, 0.5, 0.99, 1.0):
        assert argmin("klub", omega) == pytest.approx(0.785, abs=1e-5)
        assert argmin("elbo", omega) == pytest.approx(0.768, abs=1e-3)
        assert argmin("elbo", omega) < 0.78  # biased towards the lower point
    assert argmin("l2", 0.5) == pytest.approx(0.785, abs=1e-5)


# ---- objectives


class ConstDenoiser(torch.nn.Module):
    """x0_hat = scale sigmoid(theta) + shift, a real differentiable path through the loss."""

    def __init__(self, theta, scale, shift):
        super().__init__()
        self.theta, self.scale, self.shift = torch.nn.Parameter(torch.tensor(float(theta))), scale, shift

    def forward(self, logit_zt, t):
        return self.scale * torch.sigmoid(self.theta + 0 * logit_zt) + self.shift


@pytest.mark.parametrize("eta", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("scale,shift,sched", [(0.39, 0.6, "sigmoid"), (0.7, 0.1, "beta_linear")])
def test_finite_gradients_at_range_ends(eta, scale, shift, sched):
    schedule = make_schedule(sched)
    x0 = torch.tensor([shift, shift + scale] * 128).reshape(256, 1)
    for theta in (-40.0, 40.0, 0.0):  # x0_hat at the bottom end, the top end, the middle
        for name in BETA_LOSSES:
            net = ConstDenoiser(theta, scale, shift)
            loss, parts = beta_loss(
                net, x0, eta=eta, schedule=schedule, loss=name, omega=0.5, generator=gen(1)
            )
            loss.backward()
            assert loss.dtype == torch.float32 and math.isfinite(loss.item()), (name, theta)
            assert torch.isfinite(net.theta.grad).all(), (name, theta, net.theta.grad)
    # the KL terms themselves at the extreme times alpha ~ 1 (t = t_min) and alpha = alpha(1)
    for t in (1e-5, 1.0):
        t64 = torch.tensor([t], dtype=F64)
        a_t, a_s = schedule(t64), schedule(0.95 * t64)
        for end in (shift, shift + scale):
            x0_hat = torch.tensor([[end]], requires_grad=True)
            for fn in (klub_cond, klub_marg, elbo_cond, elbo_marg):
                x = torch.tensor([[shift + scale - end + shift]])  # the opposite end
                val = fn(x0_hat, x, a_s, a_t, eta)
                (g,) = torch.autograd.grad(val.sum(), x0_hat)
                assert torch.isfinite(val).all() and torch.isfinite(g).all(), (fn.__name__, t, end)


def _kl_np(a1, b1, a2, b2):
    """Independent numpy KL (the ln B / digamma form of spec §5)."""
    return (
        special.betaln(a2, b2)
        - special.betaln(a1, b1)
        + (a1 - a2) * special.digamma(a1)
        + (b1 - b2) * special.digamma(b1)
        + (a2 - a1 + b2 - b1) * special.digamma(a1 + b1)
    )


def test_beta_loss_expectation_matches_time_integral():
    # x0_hat = c: E_t[omega KL_cond + (1 - omega) KL_marg], t ~ U(t_min, 1], by quad vs the batch mean
    eta, c, x0v, omega, t_min = 1e4, 0.5, 0.55, 0.5, 1e-5
    schedule = make_schedule("beta_linear")

    def alpha(t):
        return math.exp(-0.5 * 19.9 * t * t - 0.1 * t)

    def per_t(t):
        a_t, a_s = alpha(t), alpha(0.95 * t)
        d = a_s - a_t
        cond = _kl_np(eta * d * c, eta * (1 - a_s * c), eta * d * x0v, eta * (1 - a_s * x0v))
        marg = _kl_np(eta * a_t * c, eta * (1 - a_t * c), eta * a_t * x0v, eta * (1 - a_t * x0v))
        return omega * cond + (1 - omega) * marg

    pts = [1e-4, 1e-3, 1e-2, 0.1, 0.5]
    m1 = integrate.quad(per_t, t_min, 1, points=pts, limit=400)[0] / (1 - t_min)
    m2 = integrate.quad(lambda t: per_t(t) ** 2, t_min, 1, points=pts, limit=400)[0] / (1 - t_min)
    n = 20_000
    x0 = torch.full((n, 1), x0v)
    net = lambda logit_zt, t: torch.full_like(logit_zt, c)
    loss, parts = beta_loss(net, x0, eta=eta, schedule=schedule, loss="klub", omega=omega, generator=gen(2))
    assert abs(loss.item() - m1) < 5 * math.sqrt((m2 - m1 * m1) / n), (loss.item(), m1)
    assert set(parts) == {"loss", "klub_cond", "klub_marg"}
    assert parts["loss"] == pytest.approx(
        omega * parts["klub_cond"] + (1 - omega) * parts["klub_marg"], rel=1e-5
    )
    # the exact denoiser gives exactly 0 for every KL-based loss
    exact = lambda logit_zt, t: x0
    for name in ("klub", "elbo", "klub_cond", "elbo_marg", "l2", "l1"):
        assert beta_loss(exact, x0, eta=eta, schedule=schedule, loss=name, omega=omega)[0].item() == 0.0


def test_beta_loss_contract():
    x0 = torch.rand(8, 2, 3, generator=gen(3)) * 0.39 + 0.6
    net = lambda logit_zt, t: torch.full_like(logit_zt, 0.8)
    kw = dict(eta=1e4, schedule=make_schedule("sigmoid"), omega=0.99)
    l1, p1 = beta_loss(net, x0, loss="elbo", generator=gen(4), **kw)
    l2, _ = beta_loss(net, x0, loss="elbo", generator=gen(4), **kw)
    assert l1.shape == () and l1.dtype == torch.float32 and torch.equal(l1, l2)
    assert set(p1) == {"loss", "elbo_cond", "elbo_marg"}
    assert beta_loss(net, x0.double(), loss="l2", generator=gen(4), **kw)[0].dtype == F64
    assert set(beta_loss(net, x0, loss="l2", **kw)[1]) == {"loss"}
    assert set(LOSSES) == {
        "klub",
        "elbo",
        "klub_cond",
        "klub_marg",
        "elbo_cond",
        "elbo_marg",
        "l2",
        "l1",
        "eps_mse",
        "gauss_klub",
    }
    with pytest.raises(ValueError, match="gaussian_loss"):
        beta_loss(net, x0, loss="eps_mse", **kw)
    with pytest.raises(ValueError, match="unknown loss 'kulb'"):
        beta_loss(net, x0, loss="kulb", **kw)
    with pytest.raises(ValueError, match="beta_loss"):
        gaussian_loss(net, x0, schedule=kw["schedule"], loss="klub")


# ---- Gaussian baseline


def test_gauss_klub_weight():
    ab_s = torch.tensor([0.999999, 0.5, 1e-4], dtype=F64)
    ab_t = torch.tensor([0.999998, 0.3, 5e-5], dtype=F64)
    e = torch.zeros(3, 4, dtype=F64)
    eh = torch.ones(3, 4, dtype=F64)
    snr_ratio = (ab_s / (1 - ab_s)) / (ab_t / (1 - ab_t))  # e^(logit ab_s - logit ab_t)
    expect = (0.5 * 0.5 * (snr_ratio - 1) + 0.5) * 4
    assert torch.allclose(gauss_klub(eh, e, ab_s, ab_t), expect, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(GAUSSIAN_LOSSES))
def test_gaussian_loss_expectation(name):
    # eps_hat = 0: E ||eps||^2 = D; gauss_klub: E_t[w(t)] D with w from the spec formula, by quad
    D, n, t_min = 3, 40_000, 1e-5
    schedule = make_schedule("beta_linear")

    def ab(t):
        return math.exp(-0.5 * 19.9 * t * t - 0.1 * t)

    def w(t):
        if name == "eps_mse":
            return 1.0
        s = 0.95 * t
        return 0.25 * (ab(s) * (1 - ab(t)) / (ab(t) * (1 - ab(s))) - 1) + 0.5

    w1 = integrate.quad(w, t_min, 1, limit=200)[0] / (1 - t_min)
    w2 = integrate.quad(lambda t: w(t) ** 2, t_min, 1, limit=200)[0] / (1 - t_min)
    mean, var = w1 * D, w2 * (D * D + 2 * D) - (w1 * D) ** 2
    x0 = torch.rand(n, D, generator=gen(5))
    zero = lambda x_t, t: torch.zeros_like(x_t)
    loss, parts = gaussian_loss(zero, x0, schedule=schedule, loss=name, generator=gen(6))
    assert abs(loss.item() - mean) < 5 * math.sqrt(var / n), (loss.item(), mean)
    assert parts == {"loss": pytest.approx(loss.item())}

    # point mass x0 = c: the exact eps-denoiser gives a zero loss
    c = 0.3
    x0 = torch.full((64, D), c, dtype=F64)

    def exact(x_t, t):
        a = schedule(t.double())[:, None]
        return (x_t - a.sqrt() * c) / (1 - a).sqrt()

    assert gaussian_loss(exact, x0, schedule=schedule, loss=name, generator=gen(7))[0].item() < 1e-12
