"""Datasets: synthetic laws against scipy distributions, file/idx/CIFAR readers on files the tests write,
the real Fashion-MNIST package files and scikit-learn digits, and one-line DataErrors."""

import gzip
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch

from betadiff.data import (
    DATASETS,
    FASHION_MNIST_DIR,
    MIXTURE2D_BOX,
    MIXTURE2D_POINTS,
    DataError,
    make_dataset,
)


def cfg(name, **kw):
    base = dict(name=name, path=None, low=None, high=None, image_size=None, subset=None, scale=None,
                shift=None)
    return SimpleNamespace(**{**base, **kw})


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def one_line_error(match, fn, *args):
    with pytest.raises(DataError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_registry_names():
    assert set(DATASETS) == {"toy1", "toy2", "mixture2d", "file", "fashion_mnist", "digits", "cifar10"}
    one_line_error("data.name: unknown dataset 'toy3'", make_dataset, cfg("toy3"))


def test_toy1_is_uniform_on_five_points():
    ds = make_dataset(cfg("toy1"))
    assert (ds.kind, ds.shape, ds.scale, ds.shift) == ("toy1d", (1,), 1.0, 0.0)
    x = ds.sample(50_000, gen())
    assert x.shape == (50_000, 1) and x.dtype == torch.float32
    k = torch.round(x * 7).long().ravel()
    assert torch.allclose(x.ravel(), k / 7.0)
    counts = torch.bincount(k, minlength=7).numpy()
    assert counts[0] == 0 and counts[6] == 0
    # chi-square goodness of fit against the uniform law on {1..5}/7
    assert scipy.stats.chisquare(counts[1:6]).pvalue > 1e-3
    assert torch.equal(ds.pixel_mean(), torch.full((1,), 0.5))


def test_toy2_parts_follow_their_laws():
    x = make_dataset(cfg("toy2")).sample(100_000, gen(1)).ravel().double().numpy()
    n = len(x)
    parts = {
        "uniform": (x >= 0.1) & (x <= 0.2),
        "beta15": (x >= 0.3) & (x <= 0.4),
        "mass05": x == np.float32(0.5),
        "arcsine": (x >= 0.6) & (x <= 0.7),
        "mass08": x == np.float32(0.8),
    }
    assert sum(m.sum() for m in parts.values()) == n  # nothing outside the five parts
    for m in parts.values():
        assert abs(m.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / n)
    # each continuous part against its law (scipy as the oracle); float32 rounding is far below the KS scale
    assert scipy.stats.kstest((x[parts["uniform"]] - 0.1) / 0.1, "uniform").pvalue > 1e-3
    assert scipy.stats.kstest((x[parts["beta15"]] - 0.3) / 0.1, scipy.stats.beta(1, 5).cdf).pvalue > 1e-3
    assert scipy.stats.kstest((x[parts["arcsine"]] - 0.6) / 0.1, scipy.stats.beta(0.5, 0.5).cdf).pvalue > 1e-3


def test_mixture2d_points_and_box():
    ds = make_dataset(cfg("mixture2d"))
    assert (ds.kind, ds.shape) == ("toy2d", (2,))
    x = ds.sample(40_000, gen(2))
    assert x.shape == (40_000, 2) and x.min() >= 0 and x.max() <= 1
    pts = torch.tensor(MIXTURE2D_POINTS)
    at_point = (x[:, None, :] == pts[None]).all(-1)          # (n, 3)
    (bx0, bx1), (by0, by1) = MIXTURE2D_BOX
    in_box = (x[:, 0] >= bx0) & (x[:, 0] <= bx1) & (x[:, 1] >= by0) & (x[:, 1] <= by1)
    assert torch.all(at_point.any(1) ^ in_box)
    shares = torch.cat([at_point.double().mean(0), in_box.double().mean()[None]])
    sd = (0.25 * 0.75 / 40_000) ** 0.5
    assert torch.allclose(shares, torch.full((4,), 0.25, dtype=torch.float64), atol=4 * sd)
    box = x[in_box].double().numpy()
    assert scipy.stats.kstest((box[:, 0] - bx0) / (bx1 - bx0), "uniform").pvalue > 1e-3
    assert scipy.stats.kstest((box[:, 1] - by0) / (by1 - by0), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("name", ["toy1", "toy2", "mixture2d"])
def test_synthetic_randomness_only_from_the_generator(name):
    ds = make_dataset(cfg(name))
    torch.manual_seed(123)
    a = ds.sample(1000, gen(7))
    torch.manual_seed(456)  # the global stream must not matter
    b = ds.sample(1000, gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, ds.sample(1000, gen(8)))
    assert not torch.equal(ds.reference(1000, gen(7)), ds.reference(1000, gen(9)))


# ----------------------------------------------------------------------------------------------------
# User files


def test_file_npy_1d_maps_declared_range(tmp_path):
    raw = np.array([-2.0, 0.0, 2.0, 1.0, -1.0])
    np.save(tmp_path / "d.npy", raw)
    ds = make_dataset(cfg("file", path="d.npy", low=-2.0, high=2.0), root=tmp_path)
    assert (ds.kind, ds.shape, ds.scale, ds.shift) == ("toy1d", (1,), 1.0, 0.0)
    full = ds.reference(10, gen())  # n >= size: all of it, in file order
    assert torch.allclose(full.ravel(), torch.tensor((raw + 2) / 4, dtype=torch.float32))
    part = ds.reference(3, gen())
    assert part.shape == (3, 1) and len(set(part.ravel().tolist())) == 3  # without replacement
    # training draws are uniform with replacement over the rows
    draws = ds.sample(50_000, gen(3)).ravel()
    counts = torch.stack([(draws == v).sum() for v in full.ravel()]).numpy()
    assert counts.sum() == 50_000 and scipy.stats.chisquare(counts).pvalue > 1e-3


def test_file_csv_2d_with_header_and_subset(tmp_path):
    p = tmp_path / "pts.csv"
    p.write_text("x,y\n0,10\n5,20\n10,15\n")
    ds = make_dataset(cfg("file", path=str(p), low=0, high=20, subset=2))
    assert (ds.kind, ds.shape) == ("toy2d", (2,))
    assert torch.allclose(ds.reference(5, gen()), torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(ds.pixel_mean(), torch.full((2,), 0.5))


def test_file_errors_name_file_and_problem(tmp_path):
    bad = np.array([[0.1, 0.2], [0.3, 1.7], [1.5, 0.5], [0.2, 0.2]])
    np.save(tmp_path / "bad.npy", bad)
    msg = one_line_error("outside the declared range", make_dataset,
                         cfg("file", path=str(tmp_path / "bad.npy"), low=0, high=1))
    assert str(tmp_path / "bad.npy") in msg and "2 value(s)" in msg and "first at index (1, 1)" in msg

    nan = np.array([0.1, 0.2, np.nan, 0.3, np.nan])
    np.save(tmp_path / "nan.npy", nan)
    msg = one_line_error("NaN", make_dataset, cfg("file", path=str(tmp_path / "nan.npy"), low=0, high=1))
    assert "2 NaN value(s)" in msg and "first at index (2, 0)" in msg

    unit = lambda name: cfg("file", path=str(tmp_path / name), low=0, high=1)
    one_line_error("file not found", make_dataset, unit("nope.npy"))
    np.save(tmp_path / "wide.npy", np.zeros((4, 3)))
    one_line_error("1 or 2 columns", make_dataset, unit("wide.npy"))
    (tmp_path / "d.txt").write_text("1\n")
    one_line_error("unsupported file type", make_dataset, unit("d.txt"))
    (tmp_path / "junk.csv").write_text("a,b\n1,x\n")
    one_line_error("cannot read", make_dataset, unit("junk.csv"))
    one_line_error("data.low/data.high", make_dataset, cfg("file", path=str(tmp_path / "bad.npy")))
    one_line_error("data.path: required", make_dataset, cfg("file", low=0, high=1))


# ----------------------------------------------------------------------------------------------------
# Image sets


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def write_fashion_dir(d: Path, n_train=5, n_test=3) -> dict:
    rng = np.random.default_rng(0)
    arrays = {"train": rng.integers(0, 256, (n_train, 28, 28)),
              "t10k": rng.integers(0, 256, (n_test, 28, 28))}
    for split, x in arrays.items():
        write_idx(d / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", np.arange(len(x)) % 10)
    return arrays


def test_idx_loader_on_written_files(tmp_path):
    arrays = write_fashion_dir(tmp_path)
    ds = make_dataset(cfg("fashion_mnist", path=str(tmp_path)))
    assert (ds.kind, ds.shape, ds.scale, ds.shift) == ("image", (1, 28, 28), 0.39, 0.60)
    x, y = ds.split("train")
    assert torch.equal(x[:, 0], torch.tensor(arrays["train"] / 255.0, dtype=torch.float32))
    assert y.tolist() == [0, 1, 2, 3, 4]
    test = torch.tensor(arrays["t10k"][:, None] / 255.0, dtype=torch.float32)
    assert torch.equal(ds.reference(100, gen()), test)                  # n >= size: the whole test split
    mean = torch.tensor(arrays["train"].mean(0) / 255.0, dtype=torch.float32)[None]
    assert torch.allclose(ds.pixel_mean(), mean, atol=1e-6)
    assert ds.sample(4, gen()).shape == (4, 1, 28, 28)


def test_idx_errors(tmp_path):
    msg = one_line_error("Fashion-MNIST directory not found", make_dataset,
                         cfg("fashion_mnist", path=str(tmp_path / "none")))
    assert str(tmp_path / "none") in msg and "apt-get install -y dataset-fashion-mnist" in msg
    write_fashion_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    here = cfg("fashion_mnist", path=str(tmp_path))
    one_line_error("missing t10k-labels-idx1-ubyte.gz", make_dataset, here)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + struct.pack(">I", 3) + bytes(12))  # float idx: wrong type code
    one_line_error("bad magic number", make_dataset, here)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + bytes(2))  # truncated
    one_line_error("header says", make_dataset, here)


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                    reason="needs the Debian package: apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_package_files():
    ds = make_dataset(cfg("fashion_mnist", subset=100))
    x, y = ds.split("train")
    xt, yt = ds.split("test")
    assert x.shape == (100, 1, 28, 28) and xt.shape == (10_000, 1, 28, 28)
    # oracle: a direct reading of the idx bytes (16-byte header for images, 8 for labels)
    with gzip.open(Path(FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz") as f:
        head = np.frombuffer(f.read(16 + 100 * 784), dtype=np.uint8, offset=16).reshape(100, 28, 28)
    with gzip.open(Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz") as f:
        test_labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    assert torch.equal(x[:, 0], torch.tensor(head / 255.0, dtype=torch.float32))
    assert torch.equal(yt, torch.tensor(test_labels, dtype=torch.int64))
    assert sorted(torch.bincount(yt).tolist()) == [1000] * 10
    assert 0.45 < float((xt == 0).float().mean()) < 0.55   # ≈50 % exact zeros (offline-data.md)


def test_digits_split_and_values():
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = make_dataset(cfg("digits"))
    assert (ds.kind, ds.shape, ds.scale, ds.shift) == ("image", (1, 8, 8), 0.39, 0.60)
    x, y = ds.split("train")
    xt, yt = ds.split("test")
    assert len(x) + len(xt) == len(ref.images) and len(xt) == len(ref.images) // 5
    assert torch.equal(torch.cat([x, xt]).sort(0).values,
                       torch.tensor(ref.images[:, None] / 16.0, dtype=torch.float32).sort(0).values)
    assert torch.equal(xt[0, 0], torch.tensor(ref.images[4] / 16.0, dtype=torch.float32))
    assert int(yt[0]) == int(ref.target[4])
    assert torch.all(torch.remainder(x * 16, 1) == 0)     # 17 grey levels
    assert ds.fingerprint == make_dataset(cfg("digits")).fingerprint
    assert ds.fingerprint != make_dataset(cfg("digits", subset=100)).fingerprint
    sub = make_dataset(cfg("digits", subset=100))
    assert torch.equal(sub.split("train")[0], x[:100])


def test_image_size_resamples_on_the_grey_level_grid():
    ds = make_dataset(cfg("digits", image_size=16, subset=50))
    x, _ = ds.split("train")
    assert ds.shape == (1, 16, 16) and x.shape == (50, 1, 16, 16)
    assert torch.all(torch.remainder(x * 16, 1) == 0) and x.min() == 0 and x.max() <= 1
    assert ds.sample(3, gen()).shape == (3, 1, 16, 16)
    one_line_error("data.image_size", make_dataset, cfg("digits", image_size=0))


def write_cifar_dir(d: Path, n=4) -> dict:
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f, protocol=2)
        batches[name] = (data, labels)
    return batches


def test_cifar10_batches_written_in_the_standard_format(tmp_path):
    batches = write_cifar_dir(tmp_path)
    ds = make_dataset(cfg("cifar10", path=str(tmp_path)))
    assert (ds.kind, ds.shape, ds.scale, ds.shift) == ("image", (3, 32, 32), 0.39, 0.60)
    x, y = ds.split("train")
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    data, labels = batches["data_batch_2"]
    # row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32×32
    assert torch.equal(x[4, 1, 0, :], torch.tensor(data[0, 1024:1056] / 255.0, dtype=torch.float32))
    assert torch.equal(x[4, 2, 31, 31], torch.tensor(data[0, 3071] / 255.0, dtype=torch.float32))
    assert y[4:8].tolist() == labels
    xt, yt = ds.split("test")
    assert torch.equal(xt.reshape(4, -1), torch.tensor(batches["test_batch"][0] / 255.0, dtype=torch.float32))


def test_cifar10_errors(tmp_path):
    one_line_error("data.path: required for cifar10", make_dataset, cfg("cifar10"))
    write_cifar_dir(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    here = cfg("cifar10", path=str(tmp_path))
    one_line_error("missing CIFAR-10 batch file.*data_batch_3", make_dataset, here)
    # a pickle that would run code is refused, not executed
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": SimpleNamespace(a=1), b"labels": []}, f)
    one_line_error("not a CIFAR-10 python batch", make_dataset, here)
