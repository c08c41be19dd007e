"""Sample-quality metrics (spec §8, ../shared/spec/offline-data.md). Inputs: raw samples in data space [0, 1].

- 1-D: W1, histogram JSD and Hellinger on 100 equal bins of [0, 1], the share outside [0, 1], and their floor
  (the same metrics between two independent true samples).
- 2-D: exact optimal-transport (W1, Euclidean cost) distance with POT on subsamples.
- Images: a small CNN classifier trained locally on the dataset and cached on disk gives a Fréchet distance on
  its features and an Inception-Score-style score; pixel-histogram JSD and boundary shares measure the pixel
  marginal (exact 0s and 1s), which is what beta diffusion claims to get right.

`evaluate(dataset, x_gen_raw, generator)` dispatches on `dataset.kind` (docs/architecture.md, "metrics.py").
A NaN in the generated samples makes the distribution metrics NaN (there is no bin to clip it into).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

BINS = 100            # spec §8
PIXEL_BINS = 256      # one bin per grey level k/255
BOUNDARY_LO = 0.5 / 255   # a pixel "at 0": at most half a grey level above 0 (so also anything below 0)
BOUNDARY_HI = 254.5 / 255  # a pixel "at 1": at least half a grey level below 1 (so also anything above 1)
OT_N = 2000           # exact OT costs O(n^3); ≈0.3 s at 2000 (offline-data.md)


# ----------------------------------------------------------------------------------------------------
# 1-D metrics (spec §8). Pure functions of tensors; computed in float64.


def _flat64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).to(device="cpu", dtype=torch.float64)


def w1(true: torch.Tensor, gen: torch.Tensor) -> float:
    """1-D Wasserstein-1 distance between two samples (any shapes, flattened; unclipped values).

    Exact for any sizes: ∫|F_true − F_gen| dx over the pooled sorted values. For equal sizes this is spec §8's
    mean |sort(true) − sort(gen)|.
    """
    a, b = torch.sort(_flat64(true)).values, torch.sort(_flat64(gen)).values
    pooled = torch.sort(torch.cat([a, b])).values
    width = pooled.diff()
    cdf_a = torch.searchsorted(a, pooled[:-1], right=True).double() / len(a)
    cdf_b = torch.searchsorted(b, pooled[:-1], right=True).double() / len(b)
    return float(((cdf_a - cdf_b).abs() * width).sum())


def _pmf(x: torch.Tensor, interior_edges: torch.Tensor) -> torch.Tensor:
    """Probabilities of x (flattened) in the bins cut by sorted interior edges; values beyond the outer edges
    fall into the edge bins. All-NaN if x holds a NaN."""
    x = _flat64(x)
    nbins = len(interior_edges) + 1
    if torch.isnan(x).any():
        return torch.full((nbins,), math.nan, dtype=torch.float64)
    idx = torch.bucketize(x, interior_edges, right=True)
    return torch.bincount(idx, minlength=nbins).to(torch.float64) / len(x)


def histogram(x: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """(bins,) float64 probabilities of x (flattened) on `bins` equal bins of [0, 1] (spec §8).

    Bins are [k/bins, (k+1)/bins) with the last one closed; values outside [0, 1] are clipped into the edge
    bins. All-NaN output if x holds a NaN.
    """
    return _pmf(x, torch.arange(1, bins, dtype=torch.float64) / bins)


def pixel_histogram(x: torch.Tensor) -> torch.Tensor:
    """(256,) float64 probabilities of pixel values rounded to the nearest grey level k/255: bin k is
    [(k − ½)/255, (k + ½)/255), so bins 0 and 255 hold what `boundary_shares` counts (out-of-range values
    clipped)."""
    return _pmf(x, (torch.arange(PIXEL_BINS - 1, dtype=torch.float64) + 0.5) / (PIXEL_BINS - 1))


def jsd(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence (natural log) of two probability vectors:
    ½Σp ln(p/m) + ½Σq ln(q/m), m = (p+q)/2. In [0, ln 2]; 0 ln 0 = 0."""
    m = 0.5 * (p + q)
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum()
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum()
    return float(0.5 * kl_pm + 0.5 * kl_qm)


def hellinger_pq(p: torch.Tensor, q: torch.Tensor) -> float:
    """Hellinger distance √(Σ(√p − √q)²)/√2 of two probability vectors, in [0, 1]."""
    return float(torch.sqrt(((p.sqrt() - q.sqrt()) ** 2).sum()) / math.sqrt(2.0))


def hist_jsd(true: torch.Tensor, gen: torch.Tensor, bins: int = BINS) -> float:
    """JSD between the `bins`-bin histograms of two samples on [0, 1] (spec §8)."""
    return jsd(histogram(true, bins), histogram(gen, bins))


def hellinger(true: torch.Tensor, gen: torch.Tensor, bins: int = BINS) -> float:
    """Hellinger distance between the `bins`-bin histograms of two samples on [0, 1] (spec §8)."""
    return hellinger_pq(histogram(true, bins), histogram(gen, bins))


def out_of_range(gen: torch.Tensor) -> float:
    """Share of values outside [0, 1] (NaN counts as outside)."""
    x = gen.detach()
    return float(1.0 - ((x >= 0) & (x <= 1)).to(torch.float64).mean())


def toy_metrics(true: torch.Tensor, gen: torch.Tensor) -> dict[str, float]:
    """{w1, jsd, hellinger, out_of_range} of 1-D samples (spec §8)."""
    p, q = histogram(true), histogram(gen)
    return {"w1": w1(true, gen), "jsd": jsd(p, q), "hellinger": hellinger_pq(p, q),
            "out_of_range": out_of_range(gen)}


# ----------------------------------------------------------------------------------------------------
# 2-D metric.


def _subsample(x: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    return x if len(x) <= n else x[torch.randperm(len(x), generator=generator)[:n]]


def ot_distance(true: torch.Tensor, gen: torch.Tensor, n: int = OT_N,
                generator: torch.Generator | None = None) -> float:
    """Exact W1 optimal-transport distance (Euclidean cost) between (N, D) samples, uniform weights.

    Each sample is cut to at most n rows drawn without replacement with `generator`. Solved with `ot.emd2`.
    """
    import ot  # POT: only needed for 2-D data

    a = _subsample(true.detach().cpu(), n, generator).reshape(-1, true.shape[-1]).double().numpy()
    b = _subsample(gen.detach().cpu(), n, generator).reshape(-1, gen.shape[-1]).double().numpy()
    if np.isnan(b).any() or np.isnan(a).any():
        return math.nan
    cost = ot.dist(a, b, metric="euclidean")
    wa, wb = np.full(len(a), 1.0 / len(a)), np.full(len(b), 1.0 / len(b))
    return float(ot.emd2(wa, wb, cost, numItermax=10_000_000))


# ----------------------------------------------------------------------------------------------------
# Floors: the same metrics between two independent true samples (what a perfect model would score at this n).

_FLOORS: dict[tuple[str, int], dict[str, float]] = {}
FLOOR_SEED = 20231109  # `evaluate` gives floors their own fixed stream: independent of the evaluation stream


def floor(dataset, n: int, generator: torch.Generator | None = None) -> dict[str, float]:
    """Metrics between two independent `dataset.reference(n)` draws, cached per (dataset content, n).

    toy1d: {w1, jsd, hellinger}; toy2d: {ot}. The first call's generator decides the cached value. For a
    finite set no larger than n both draws are the whole set, so its floor is 0.
    """
    key = (dataset.fingerprint, n)
    if key not in _FLOORS:
        a, b = dataset.reference(n, generator), dataset.reference(n, generator)
        if dataset.kind == "toy2d":
            _FLOORS[key] = {"ot": ot_distance(a, b, generator=generator)}
        else:
            m = toy_metrics(a, b)
            _FLOORS[key] = {k: m[k] for k in ("w1", "jsd", "hellinger")}
    return dict(_FLOORS[key])


# ----------------------------------------------------------------------------------------------------
# Image metrics: a small CNN classifier trained on the dataset's own training split.


class SmallCNN(nn.Module):
    """[conv3×3-BN-ReLU-maxpool2] × 2 (width, 2·width channels), flatten, fc(128)-ReLU, fc(classes).

    Input (B, C, H, W) in [0, 1] (H, W rounded down to multiples of 4 by the pools). `features` is the 128-d
    penultimate activation (after ReLU), the space of the Fréchet distance. The full (H/4)×(W/4) map is
    flattened: averaging it down to 4×4 cost ≈2-5 points of Fashion-MNIST accuracy.
    """

    def __init__(self, in_channels: int, hw: tuple[int, int], num_classes: int = 10, width: int = 16,
                 feat_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (hw[0] // 4) * (hw[1] // 4), feat_dim), nn.ReLU())
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(2.0 * x - 1.0)  # centre the [0, 1] input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# Adam with a one-cycle learning rate, epochs per dataset. Measured here (2 cores): Fashion-MNIST 1 epoch,
# ≈25 s of CPU, test accuracy 0.891; digits 10 epochs, ≈1.5 s of CPU, 0.994.
CLASSIFIER_RECIPE = {"batch_size": 128, "lr": 3e-3, "seed": 0}
CLASSIFIER_EPOCHS = {"fashion_mnist": 1, "digits": 10, "cifar10": 4}
CLASSIFIER_VERSION = 3  # bump when SmallCNN or the recipe changes: old cache files are then ignored


def cache_dir() -> Path:
    """`$BETADIFF_CACHE` or ~/.cache/betadiff."""
    return Path(os.environ.get("BETADIFF_CACHE") or Path.home() / ".cache" / "betadiff")


def _classifier_path(dataset, epochs: int) -> Path:
    key = hashlib.sha256(f"{dataset.fingerprint}|{CLASSIFIER_VERSION}|{CLASSIFIER_RECIPE}|{epochs}".encode())
    return cache_dir() / "classifiers" / f"{dataset.name}-{key.hexdigest()[:16]}.pt"


@torch.inference_mode()
def _batched(fn, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


@contextlib.contextmanager
def _num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_classifier(dataset, epochs: int | None = None) -> tuple[SmallCNN, float]:
    """Train SmallCNN on `dataset.split("train")`; returns (model in eval mode, accuracy on the test split).

    Deterministic: weights and batch order come from CLASSIFIER_RECIPE["seed"]; torch's global RNG is left as
    it was.
    """
    # tiny images: thread synchronisation costs more than it saves (≈15× slower with 2 threads on a busy box)
    with _num_threads(1 if math.prod(dataset.shape) <= 1024 else torch.get_num_threads()):
        return _train_classifier(dataset, epochs or CLASSIFIER_EPOCHS.get(dataset.name, 4))


def _train_classifier(dataset, epochs: int) -> tuple[SmallCNN, float]:
    r = CLASSIFIER_RECIPE
    x, y = dataset.split("train")
    num_classes = int(y.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r["seed"])
        model = SmallCNN(dataset.shape[0], dataset.shape[1:], num_classes)
    g = torch.Generator().manual_seed(r["seed"])
    steps_per_epoch = math.ceil(len(x) / r["batch_size"])
    opt = torch.optim.Adam(model.parameters(), lr=r["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), r["batch_size"]):
            idx = order[i:i + r["batch_size"]]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    xt, yt = dataset.split("test")
    acc = float((_batched(model, xt).argmax(1) == yt).to(torch.float64).mean())
    return model, acc


def load_or_train_classifier(dataset, epochs: int | None = None) -> tuple[SmallCNN, dict]:
    """The dataset's classifier from the disk cache, or trained and saved there (atomically) if absent.

    Returns (model, info) with info = {"accuracy", "path", "cached": loaded from disk}. The cache key covers
    the dataset content, the recipe and CLASSIFIER_VERSION. Only a state_dict is stored (loaded with
    weights_only=True).
    """
    epochs = epochs or CLASSIFIER_EPOCHS.get(dataset.name, 4)
    path = _classifier_path(dataset, epochs)
    if path.is_file():
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            model = SmallCNN(dataset.shape[0], dataset.shape[1:], ck["num_classes"])
            model.load_state_dict(ck["state_dict"])
            model.eval()
            return model, {"accuracy": ck["accuracy"], "path": str(path), "cached": True}
        except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError):
            pass  # a damaged cache file (e.g. a killed writer on another file system): train again
    model, acc = train_classifier(dataset, epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent trials may race: last rename wins
    torch.save({"state_dict": model.state_dict(), "accuracy": acc, "num_classes": model.head.out_features,
                "dataset": dataset.name, "shape": list(dataset.shape)}, tmp)
    os.replace(tmp, path)
    return model, {"accuracy": acc, "path": str(path), "cached": False}


_CLASSIFIERS: dict[str, SmallCNN] = {}


def classifier_for(dataset) -> SmallCNN:
    """`load_or_train_classifier`, memoised in this process (evaluations reuse the loaded model)."""
    key = str(_classifier_path(dataset, CLASSIFIER_EPOCHS.get(dataset.name, 4)))
    if key not in _CLASSIFIERS:
        _CLASSIFIERS[key] = load_or_train_classifier(dataset)[0]
    return _CLASSIFIERS[key]


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to (N, F) and (M, F) features (float64):
    ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½)."""
    a, b = feats_a.detach().cpu().double().numpy(), feats_b.detach().cpu().double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        # dead ReLU features make the covariances singular; sqrtm warns but its result is checked just below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        # singular product (few samples): nudge both covariances, as pytorch-fid does
        eps = 1e-6 * np.eye(len(cov_a))
        covmean = scipy.linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)  # tiny imaginary parts are numerical error
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def classifier_score(logits: torch.Tensor) -> float:
    """Inception-Score-style exp(E_x KL(p(y|x) ‖ p(y))) from (N, classes) logits; in [1, classes]."""
    logp = torch.log_softmax(logits.detach().double(), dim=1)
    logp_marg = torch.logsumexp(logp, dim=0) - math.log(len(logp))
    return float(torch.exp((logp.exp() * (logp - logp_marg)).sum(1).mean()))


def pixel_jsd(true: torch.Tensor, gen: torch.Tensor) -> float:
    """JSD of the 256-bin pixel-value histograms (`pixel_histogram`: one bin per grey level k/255)."""
    return jsd(pixel_histogram(true), pixel_histogram(gen))


def boundary_shares(x: torch.Tensor) -> tuple[float, float]:
    """(share of pixels ≤ 0.5/255, share ≥ 254.5/255): pixels within half a grey level of 0 or 1 (out-of-range
    values count with their side)."""
    x = x.detach().to(torch.float64)
    share = lambda mask: float(mask.to(torch.float64).mean())
    return share(x <= BOUNDARY_LO), share(x >= BOUNDARY_HI)


def image_metrics(dataset, gen: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, float]:
    """Image metrics of (N, C, H, W) raw samples against `dataset.reference(N)` (the test split).

    fd: Fréchet distance on classifier features; cls_score: classifier score of gen; pix_jsd; boundary_lo/hi
    of gen and of the reference (…_true); boundary_err = |lo − lo_true| + |hi − hi_true|; out_of_range. The
    classifier sees gen clamped to [0, 1].
    """
    gen = gen.detach().cpu().float()
    true = dataset.reference(len(gen), generator)
    net = classifier_for(dataset)
    clamped = gen.nan_to_num(0.5).clamp(0.0, 1.0)
    f_true, f_gen = _batched(net.features, true), _batched(net.features, clamped)
    lo, hi = boundary_shares(gen)
    lo_t, hi_t = boundary_shares(true)
    return {"fd": frechet_distance(f_true, f_gen), "cls_score": classifier_score(_batched(net.head, f_gen)),
            "pix_jsd": pixel_jsd(true, gen), "boundary_lo": lo, "boundary_hi": hi, "boundary_lo_true": lo_t,
            "boundary_hi_true": hi_t, "boundary_err": abs(lo - lo_t) + abs(hi - hi_t),
            "out_of_range": out_of_range(gen)}


# ----------------------------------------------------------------------------------------------------


def evaluate(dataset, x_gen_raw: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, float]:
    """Metrics of generated raw samples (N, *dataset.shape) against fresh true / held-out samples.

    toy1d: w1, jsd, hellinger, out_of_range, floor_w1, floor_jsd, floor_hellinger (floor at the same N,
    computed once per dataset with a fixed seed); toy2d: ot, out_of_range; image: see `image_metrics`.
    """
    gen = x_gen_raw.detach().cpu().float()
    if dataset.kind == "toy1d":
        out = toy_metrics(dataset.reference(len(gen), generator), gen)
        fl = floor(dataset, len(gen), torch.Generator().manual_seed(FLOOR_SEED))
        out.update({f"floor_{k}": v for k, v in fl.items()})
        return out
    if dataset.kind == "toy2d":
        true = dataset.reference(len(gen), generator)
        return {"ot": ot_distance(true, gen, generator=generator), "out_of_range": out_of_range(gen)}
    if dataset.kind == "image":
        return image_metrics(dataset, gen, generator)
    raise ValueError(f"unknown dataset kind {dataset.kind!r}")
