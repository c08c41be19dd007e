import pytest
import torch

from betadiff import process
from betadiff.nets import MLP, UNet, num_params, sinusoidal_embedding
from betadiff.precond import BetaPrecond, GaussianPrecond


def test_embedding_matches_spec_angles():
    t = torch.tensor([0.0, 0.3])
    e = sinusoidal_embedding(t, 20)
    k = torch.arange(10)
    ang = 1000 * 0.3 / 10000 ** (2 * k / 20)
    assert e.shape == (2, 20)
    torch.testing.assert_close(e[1], torch.cat([torch.sin(ang), torch.cos(ang)]))


def test_toy_mlp_is_the_spec_network():
    net = MLP(1, 256, 2, 20)
    assert [m.in_features for m in net.net if isinstance(m, torch.nn.Linear)] == [21, 256, 256]
    assert net(torch.randn(5, 1), torch.rand(5)).shape == (5, 1)


@pytest.mark.parametrize("shape,mult,attn", [((1, 28, 28), (1, 2, 2), (7,)), ((1, 8, 8), (1, 2), (4,)),
                                             ((3, 32, 32), (1, 2, 2), (8,))])
def test_unet_shapes(shape, mult, attn):
    net = UNet(shape[0], shape[-1], 16, mult, 1, attn)
    x = torch.randn(2, *shape)
    assert net(x, torch.rand(2)).shape == x.shape
    assert num_params(net) > 10_000


def test_beta_precond_keeps_x0_hat_in_range():
    sched = process.make_schedule("sigmoid", c0=10.0, c1=-13.0, p=1.0)
    net = UNet(1, 8, 16, (1, 2), 1, ())
    for p in net.parameters():  # a net far from its init must still give x̂0 inside the range
        torch.nn.init.normal_(p, std=0.5)
    den = BetaPrecond(net, eta=1e4, scale=0.39, shift=0.6, schedule=sched, mode="image")
    t = torch.rand(4)
    x0 = 0.6 + 0.39 * torch.rand(4, 1, 8, 8)
    logit = process.sample_logit_marginal(x0, sched(t), 1e4, generator=torch.Generator().manual_seed(0))
    out = den(logit, t)
    assert out.shape == x0.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.6 and float(out.max()) <= 0.99


def test_image_precond_normalises_inputs():
    """With x0 ~ U[shift, shift+scale], the net's input h has ≈ zero mean and ≈ unit sd (spec §6)."""
    sched = process.make_schedule("sigmoid", c0=10.0, c1=-13.0, p=1.0)
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, h, c):
            seen["h"] = h
            return torch.zeros_like(h)

    den = BetaPrecond(Probe(), eta=1e4, scale=0.39, shift=0.6, schedule=sched, mode="image")
    g = torch.Generator().manual_seed(1)
    for tv in (0.1, 0.5, 0.9):
        t = torch.full((20000,), tv)
        x0 = 0.6 + 0.39 * torch.rand(20000, 1, generator=g)
        den(process.sample_logit_marginal(x0, sched(t), 1e4, generator=g), t)
        h = seen["h"]
        assert abs(float(h.mean())) < 0.1 and 0.7 < float(h.std()) < 1.3, (tv, float(h.mean()), float(h.std()))


def test_gaussian_precond_passes_through():
    sched = process.make_schedule("beta_linear", beta_min=0.1, beta_d=19.9)
    net = MLP(1, 8, 1, 20)
    assert GaussianPrecond(net, schedule=sched)(torch.randn(3, 1), torch.rand(3)).shape == (3, 1)


def test_bf16_autocast_keeps_x0_hat_in_float32():
    """x̂0 at bf16 resolution (~4e-3) would wreck the KL at η = 1e4: the precond returns float32."""
    sched = process.make_schedule("beta_linear", beta_min=0.1, beta_d=19.9)
    den = BetaPrecond(MLP(1, 32, 2, 20), eta=1e4, scale=1.0, shift=0.0, schedule=sched, mode="toy")
    x, t = torch.randn(64, 1), torch.rand(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = den(x, t)
    assert out.dtype == torch.float32
    assert len(torch.unique(out)) > 32  # not quantised onto a coarse grid
