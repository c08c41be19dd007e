"""Metrics against independent oracles: scipy's W1 and Jensen-Shannon, a direct numpy Hellinger, an
assignment solver for exact OT, the closed-form Fréchet distance of Gaussians, and a classifier really trained
on digits."""

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.optimize
import scipy.spatial.distance
import scipy.stats
import torch

from betadiff import metrics as M
from betadiff.data import FiniteDataset, make_dataset


def cfg(name, **kw):
    base = dict(name=name, path=None, low=None, high=None, image_size=None, subset=None)
    return SimpleNamespace(**{**base, **kw})


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def np_hist(x, bins=100):
    """Oracle histogram: numpy's, after clipping into [0, 1] (spec §8)."""
    counts, _ = np.histogram(np.clip(np.asarray(x, dtype=np.float64).ravel(), 0, 1), bins=bins, range=(0, 1))
    return counts / counts.sum()


# ----------------------------------------------------------------------------------------------------
# 1-D metrics


@pytest.mark.parametrize("sizes", [(5000, 5000), (3000, 4500)])
def test_w1_matches_scipy(sizes):
    g = gen(1)
    a = torch.rand(sizes[0], generator=g) ** 2
    b = torch.randn(sizes[1], 1, generator=g) * 0.2 + 0.5  # partly outside [0, 1]: W1 is not clipped
    expected = scipy.stats.wasserstein_distance(a.double().numpy(), b.double().numpy().ravel())
    assert M.w1(a, b) == pytest.approx(expected, rel=1e-9)
    if sizes[0] == sizes[1]:  # spec §8's formula
        sorted_gap = (a.double().sort().values - b.double().ravel().sort().values).abs().mean()
        assert M.w1(a, b) == pytest.approx(float(sorted_gap), rel=1e-12)


def test_histogram_jsd_hellinger_match_oracles():
    g = gen(2)
    a = torch.distributions.Beta(2.0, 5.0).sample((20_000,))
    b = torch.rand(20_000, generator=g) * 1.2 - 0.1          # ≈17 % outside [0, 1]: clipped into edge bins
    p, q = np_hist(a), np_hist(b)
    assert np.allclose(M.histogram(a).numpy(), p) and np.allclose(M.histogram(b).numpy(), q)
    assert M.histogram(b)[0] > 2 * M.histogram(b)[1]              # the clipped mass sits in the edge bins
    js_scipy = scipy.spatial.distance.jensenshannon(p, q) ** 2     # scipy returns the root (natural log)
    assert M.hist_jsd(a, b) == pytest.approx(js_scipy, rel=1e-9)
    hell = np.sqrt(((np.sqrt(p) - np.sqrt(q)) ** 2).sum()) / np.sqrt(2)
    assert M.hellinger(a, b) == pytest.approx(hell, rel=1e-9)


def test_divergence_identities():
    g = gen(3)
    a, b = torch.rand(5000, generator=g), torch.rand(5000, generator=g) ** 3
    assert M.hist_jsd(a, a) == 0.0 and M.hellinger(a, a) == 0.0
    assert M.hist_jsd(a, b) == pytest.approx(M.hist_jsd(b, a), rel=1e-12)
    assert M.hellinger(a, b) == pytest.approx(M.hellinger(b, a), rel=1e-12)
    assert 0 < M.hist_jsd(a, b) < math.log(2) and 0 < M.hellinger(a, b) < 1
    lo, hi = torch.full((100,), 0.05), torch.full((100,), 0.95)  # disjoint supports: the maxima
    assert M.hist_jsd(lo, hi) == pytest.approx(math.log(2), rel=1e-12)
    assert M.hellinger(lo, hi) == pytest.approx(1.0, rel=1e-12)


def test_out_of_range_and_nan():
    x = torch.tensor([-0.1, 0.0, 0.5, 1.0, 1.2, float("nan"), 0.3, 0.9])
    assert M.out_of_range(x) == pytest.approx(3 / 8)
    m = M.toy_metrics(torch.rand(10), x)
    assert math.isnan(m["jsd"]) and math.isnan(m["hellinger"]) and math.isnan(m["w1"])


def test_toy1_floor_order_of_magnitude_and_cache():
    ds = make_dataset(cfg("toy1"))
    fl = M.floor(ds, 100_000, gen(4))
    # spec §8: W1 ≈ 0.0009, JSD ≈ 1.6e-5, Hellinger ≈ 0.004 at 100k (one draw each; JSD ≈ χ²₄/(4n) spreads
    # over a decade, so only the order of magnitude is checked)
    assert 1e-4 < fl["w1"] < 5e-3 and 1e-6 < fl["jsd"] < 1e-4 and 5e-4 < fl["hellinger"] < 1e-2
    assert M.floor(ds, 100_000, gen(99)) == fl                    # cached per dataset and n
    assert M.floor(make_dataset(cfg("toy1")), 100_000) == fl      # content-keyed, not object-keyed
    assert M.floor(ds, 1000, gen(4))["jsd"] > 10 * fl["jsd"]      # smaller n, higher floor


def test_evaluate_toy1d_separates_good_from_smeared():
    ds = make_dataset(cfg("toy2"))
    n = 20_000
    good = M.evaluate(ds, ds.sample(n, gen(5)), gen(6))
    assert set(good) == {"w1", "jsd", "hellinger", "out_of_range", "floor_w1", "floor_jsd", "floor_hellinger"}
    # a perfect sampler scores at its floor; Gaussian smearing (what Gaussian diffusion does) does not
    assert good["jsd"] < 3 * good["floor_jsd"] and good["out_of_range"] == 0
    smeared = ds.sample(n, gen(7)) + 0.02 * torch.randn(n, 1, generator=gen(8))
    bad = M.evaluate(ds, smeared, gen(6))
    assert bad["jsd"] > 20 * good["jsd"] and bad["hellinger"] > 3 * good["hellinger"]
    assert bad["floor_jsd"] == good["floor_jsd"]
    assert M.evaluate(ds, smeared, gen(6)) == bad                 # deterministic given the generator


# ----------------------------------------------------------------------------------------------------
# 2-D


def test_toy2_point_masses_sit_on_bin_edges():
    """Spec §8's bins are [k/100, (k+1)/100) and Toy2's point masses 0.5 and 0.8 are edges: a second true sample
    with its point masses moved down by 1e-6 (far below a bin's width) scores as if they were misplaced, one moved
    up scores the floor, half each way pays ≈ 0.043 per point mass (numpy histogram as the oracle)."""
    toy2 = make_dataset(cfg("toy2"))
    true, x = (toy2.reference(100_000, gen(s)).double().flatten() for s in (0, 1))
    at = (x == 0.5) | (x == float(torch.tensor(0.8)))
    assert 0.38 < float(at.double().mean()) < 0.42
    half = torch.where(torch.arange(len(x)) % 2 == 0, 1e-6, -1e-6).double()
    jsd = {name: M.hist_jsd(true, torch.where(at, x + move, x)) for name, move in
           (("exact", 0.0), ("up", 1e-6), ("down", -1e-6), ("half", half))}
    p = np_hist(true.numpy())
    for name, move in (("down", -1e-6), ("half", half)):
        q = np_hist(torch.where(at, x + move, x).numpy())
        assert jsd[name] == pytest.approx(scipy.spatial.distance.jensenshannon(p, q) ** 2, rel=1e-6)
    assert jsd["exact"] == jsd["up"] < 1e-3
    assert jsd["down"] == pytest.approx(2 * 0.2 * math.log(2), rel=0.05)  # both masses (0.2 each) one bin low
    assert 0.075 < jsd["half"] < 0.095


def test_ot_distance_matches_assignment_oracle():
    g = gen(9)
    a, b = torch.rand(300, 2, generator=g), torch.rand(300, 2, generator=g) ** 2
    cost = np.linalg.norm(a.double().numpy()[:, None] - b.double().numpy()[None], axis=-1)
    rows, cols = scipy.optimize.linear_sum_assignment(cost)      # equal uniform weights: OT = assignment
    assert M.ot_distance(a, b) == pytest.approx(cost[rows, cols].mean(), rel=1e-9)
    assert M.ot_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    # subsampling uses the generator only
    big_a, big_b = torch.rand(3000, 2, generator=g), torch.rand(3000, 2, generator=g)
    assert M.ot_distance(big_a, big_b, n=500, generator=gen(1)) == M.ot_distance(big_a, big_b, n=500,
                                                                                generator=gen(1))


def test_evaluate_toy2d():
    ds = make_dataset(cfg("mixture2d"))
    good = M.evaluate(ds, ds.sample(1500, gen(10)), gen(11))
    assert set(good) == {"ot", "out_of_range"}
    shifted = M.evaluate(ds, ds.sample(1500, gen(10)) + 0.15, gen(11))   # moves every point by 0.15·√2
    assert shifted["ot"] > 0.15 > 3 * good["ot"] and shifted["out_of_range"] > 0
    assert 0.5 * M.floor(ds, 1500, gen(12))["ot"] < good["ot"] < 2 * M.floor(ds, 1500)["ot"]  # cached


# ----------------------------------------------------------------------------------------------------
# Images


def test_frechet_distance_closed_form():
    g = gen(12)
    n, d = 100_000, 4
    sd_a, sd_b = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.5, 1.0, 0.5, 3.0])
    mu_b = torch.tensor([0.0, 1.0, -1.0, 0.5])
    a = torch.randn(n, d, generator=g, dtype=torch.float64) * sd_a
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * sd_b + mu_b
    # diagonal covariances: FD = ‖Δμ‖² + Σ (σa − σb)²
    expected = float((mu_b ** 2).sum() + ((sd_a - sd_b) ** 2).sum())
    assert M.frechet_distance(a, b) == pytest.approx(expected, rel=0.03)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # a full covariance: compare against the formula with an eigen-decomposition square root
    mix = torch.tensor([[1.0, 0.5, 0, 0], [0, 1.0, 0.3, 0], [0, 0, 1.0, -0.4], [0, 0, 0, 1.0]],
                       dtype=torch.float64)
    c = torch.randn(5000, d, generator=g, dtype=torch.float64) @ mix
    ca, cc = np.cov(a.numpy(), rowvar=False), np.cov(c.numpy(), rowvar=False)
    w, v = np.linalg.eigh(ca)
    ra = v @ np.diag(np.sqrt(w)) @ v.T                            # Tr√(Σa Σc) = Tr√(√Σa Σc √Σa)
    tr = np.sqrt(np.linalg.eigvalsh(ra @ cc @ ra)).sum()
    exp2 = ((a.numpy().mean(0) - c.numpy().mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cc) - 2 * tr
    assert M.frechet_distance(a, c) == pytest.approx(exp2, rel=1e-8)


def test_classifier_score_bounds():
    sure = torch.eye(10) * 50                      # confident, all classes equally used: the maximum, 10
    assert M.classifier_score(sure.repeat(20, 1)) == pytest.approx(10.0, rel=1e-6)
    assert M.classifier_score(sure[[3] * 200]) == pytest.approx(1.0, abs=1e-6)  # one class only
    assert M.classifier_score(torch.zeros(50, 10)) == pytest.approx(1.0)       # no confidence


def test_boundary_shares_and_pixel_jsd():
    x = torch.tensor([-0.2, 0.0, 0.4 / 255, 0.6 / 255, 0.5, 254.4 / 255, 254.6 / 255, 1.0, 1.3, 0.7])
    assert M.boundary_shares(x) == pytest.approx((0.3, 0.3))
    t = torch.arange(256).repeat(4) / 255.0
    assert torch.equal(M.pixel_histogram(t), torch.full((256,), 1 / 256, dtype=torch.float64))
    assert M.pixel_histogram(x)[0] == 0.3 and M.pixel_histogram(x)[255] == 0.3  # the boundary shares
    assert M.pixel_jsd(t, t) == 0.0
    assert M.pixel_jsd(t, t + 0.4 / 255) == 0.0                   # rounds to the same grey levels
    # every level moves one bin up (255 is clipped back): only bins 0 and 255 differ, q = (0, 1, …, 1, 2)/256
    expected = (math.log(2) + math.log(2 / 3)) / 512 + math.log(4 / 3) / 256
    assert M.pixel_jsd(t, t + 0.6 / 255) == pytest.approx(expected, rel=1e-9)


@pytest.fixture(scope="module")
def digits_env(tmp_path_factory):
    """The digits dataset and a fresh classifier cache (real training: ≈1–2 s of CPU)."""
    old = os.environ.get("BETADIFF_CACHE")
    os.environ["BETADIFF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    M._CLASSIFIERS.clear()
    ds = make_dataset(cfg("digits"))
    model, info = M.load_or_train_classifier(ds)
    yield ds, model, info
    M._CLASSIFIERS.clear()
    if old is None:
        os.environ.pop("BETADIFF_CACHE")
    else:
        os.environ["BETADIFF_CACHE"] = old


def test_classifier_trains_and_cache_is_reused(digits_env):
    ds, model, info = digits_env
    assert not info["cached"] and info["accuracy"] > 0.95
    path = info["path"]
    assert path.startswith(os.environ["BETADIFF_CACHE"]) and "/classifiers/digits-" in path
    mtime = os.stat(path).st_mtime_ns
    again, info2 = M.load_or_train_classifier(ds)
    assert info2["cached"] and info2["path"] == path and os.stat(path).st_mtime_ns == mtime
    assert info2["accuracy"] == info["accuracy"]
    x, _ = ds.split("test")
    assert torch.equal(again(x), model(x))                       # the same weights came back
    # another dataset content -> another cache entry
    assert M._classifier_path(make_dataset(cfg("digits", subset=500)), 10) != M._classifier_path(ds, 10)


def test_classifier_deterministic_and_damaged_cache_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("BETADIFF_CACHE", str(tmp_path))
    x = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=gen(17))
    y = torch.arange(40) % 2
    ds = FiniteDataset("tiny", "image", x, x[:10], denom=255.0, train_labels=y, test_labels=y[:10])
    torch.manual_seed(0)
    first, info = M.load_or_train_classifier(ds)
    torch.manual_seed(1)  # the global stream must not matter
    second, _ = M.train_classifier(ds)
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    Path(info["path"]).write_bytes(b"not a checkpoint")
    assert not M.load_or_train_classifier(ds)[1]["cached"]      # retrained and rewritten
    assert M.load_or_train_classifier(ds)[1]["cached"]


def test_fd_real_vs_real_small_single_class_large(digits_env):
    ds, model, _ = digits_env
    x, y = ds.split("train")
    xt, yt = ds.split("test")
    with torch.inference_mode():
        f_train, f_test = model.features(x), model.features(xt)
    real = M.frechet_distance(f_test, f_train)
    one_class = M.frechet_distance(f_test[yt == 3], f_train)
    assert one_class > 20 * real
    with torch.inference_mode():
        assert M.classifier_score(model(xt)) > 7 and M.classifier_score(model(xt[yt == 3])) < 1.5


def test_evaluate_images(digits_env):
    ds, _, info = digits_env
    xt, yt = ds.split("test")
    real = M.evaluate(ds, ds.sample(300, gen(13)), gen(14))
    assert set(real) == {"fd", "cls_score", "pix_jsd", "boundary_lo", "boundary_hi", "boundary_lo_true",
                         "boundary_hi_true", "boundary_err", "out_of_range"}
    assert M._CLASSIFIERS and os.stat(info["path"])               # memoised, loaded from the cache file
    # generated-looking samples: squeezed into [0.05, 0.95] they lose the exact 0s and 1s and the grey levels
    squeezed = M.evaluate(ds, 0.05 + 0.9 * ds.sample(300, gen(13)), gen(14))
    assert real["boundary_lo_true"] > 0.3 and abs(real["boundary_lo"] - real["boundary_lo_true"]) < 0.05
    assert squeezed["boundary_lo"] == 0 and squeezed["boundary_hi"] == 0
    assert squeezed["boundary_err"] == pytest.approx(squeezed["boundary_lo_true"]
                                                     + squeezed["boundary_hi_true"])
    assert squeezed["boundary_err"] > 5 * real["boundary_err"] and squeezed["pix_jsd"] > 5 * real["pix_jsd"]
    assert squeezed["out_of_range"] == 0 == real["out_of_range"]
    noise = 0.1 * torch.randn(300, 1, 8, 8, generator=gen(15))
    noisy = M.evaluate(ds, ds.sample(300, gen(13)) + noise, gen(14))
    assert noisy["out_of_range"] > 0.2
    perm = torch.randperm(64, generator=gen(16))                  # same pixels, no digit shapes
    scrambled = ds.sample(300, gen(13)).reshape(300, 64)[:, perm].reshape(300, 1, 8, 8)
    scrambled = M.evaluate(ds, scrambled, gen(14))
    assert scrambled["fd"] > 3 * real["fd"] and scrambled["pix_jsd"] == real["pix_jsd"]
    assert real["cls_score"] > 6
