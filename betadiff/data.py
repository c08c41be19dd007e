"""Datasets: synthetic toys (spec §8), a user's 1-D/2-D file, and image sets read from local files.

Every dataset yields raw data x ∈ [0, 1] (spec §1); the model-space map x0 = scale·x + shift belongs to the
trainer, which takes `scale`/`shift` from here as defaults. Nothing is downloaded: image sets come from
packages (Fashion-MNIST: Debian `dataset-fashion-mnist`; 8×8 digits: scikit-learn) or a user's directory
(CIFAR-10 python batches). See docs/architecture.md ("data.py") and ../shared/spec/offline-data.md.

Randomness goes only through the `torch.Generator` passed in (None: torch's default generator).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"   # where `dataset-fashion-mnist` puts the idx files
FASHION_MNIST_APT = "apt-get install -y dataset-fashion-mnist"
IMAGE_SCALE, IMAGE_SHIFT = 0.39, 0.60                      # spec §1: x0 ∈ [0.60, 0.99]


class DataError(ValueError):
    """Unusable data, phrased as one line naming the file or key and the problem."""


# ----------------------------------------------------------------------------------------------------
# Dataset objects.


class Dataset:
    """Common attributes: `name`, `kind` ("toy1d" | "toy2d" | "image"), `shape` (per sample), `scale`,
    `shift`.

    `fingerprint` identifies the content (used by metric caches); `has_labels` says whether `split()` carries
    class labels (image sets).
    """

    has_labels = False

    def __init__(self, name: str, kind: str, shape: tuple[int, ...], scale: float, shift: float):
        self.name, self.kind, self.shape = name, kind, tuple(shape)
        self.scale, self.shift = float(scale), float(shift)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, *shape) float32 in [0, 1]: training draws."""
        raise NotImplementedError

    def reference(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n', *shape) float32 in [0, 1]: true samples to score against (n' = n, or all of the held-out
        split)."""
        raise NotImplementedError

    def pixel_mean(self) -> torch.Tensor:
        """(*shape) float32 in [0, 1]: per-pixel training mean for images, the range midpoint 0.5 otherwise
        (spec §3, prior mean μ)."""
        return torch.full(self.shape, 0.5)

    @property
    def fingerprint(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, shape={self.shape})"


class SyntheticDataset(Dataset):
    """Infinite data from a sampler `draw(n, generator) -> (n, *shape)`; `reference` draws fresh ones too."""

    def __init__(self, name: str, kind: str, shape: tuple[int, ...], draw: Callable, scale: float = 1.0,
                 shift: float = 0.0):
        super().__init__(name, kind, shape, scale, shift)
        self._draw = draw

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._draw(n, generator)

    def reference(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._draw(n, generator)


class FiniteDataset(Dataset):
    """A finite set held in memory as one tensor per split: uint8 (x = byte/denom) or float32 (denom = 1).

    `sample` draws uniformly with replacement from the training split; `reference` draws n items without
    replacement from the test split (the training split when there is none), or returns all of it if n ≥ size.
    """

    def __init__(self, name: str, kind: str, train: torch.Tensor, test: torch.Tensor | None = None, *,
                 denom: float = 1.0, train_labels: torch.Tensor | None = None,
                 test_labels: torch.Tensor | None = None, scale: float = 1.0, shift: float = 0.0):
        super().__init__(name, kind, tuple(train.shape[1:]), scale, shift)
        if len(train) == 0:
            raise DataError(f"data.name={name}: the training split is empty")
        self.train_x, self.test_x = train, test
        self.train_y, self.test_y = train_labels, test_labels
        self.denom = float(denom)
        self.has_labels = train_labels is not None and (test is None or test_labels is not None)
        self._fingerprint: str | None = None

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) / self.denom if x.dtype == torch.uint8 else x.to(torch.float32)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(len(self.train_x), (n,), generator=generator)
        return self._float(self.train_x[idx])

    def reference(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.test_x if self.test_x is not None else self.train_x
        if n >= len(x):
            return self._float(x)
        return self._float(x[torch.randperm(len(x), generator=generator)[:n]])

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """("train" | "test") -> (x float32 (N, *shape) in [0, 1], labels int64 (N,) or None)."""
        if which == "train":
            return self._float(self.train_x), self.train_y
        if which == "test":
            if self.test_x is None:
                return self._float(self.train_x), self.train_y
            return self._float(self.test_x), self.test_y
        raise ValueError(f"split must be 'train' or 'test' (got {which!r})")

    def pixel_mean(self) -> torch.Tensor:
        if self.kind != "image":
            return super().pixel_mean()
        return self.train_x.to(torch.float64).mean(0).div(self.denom).to(torch.float32)

    @property
    def fingerprint(self) -> str:
        """sha256 over name, shape and the bytes of every split (computed once)."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.name}|{self.shape}|{self.denom}".encode())
            for t in (self.train_x, self.train_y, self.test_x, self.test_y):
                h.update(b"|" if t is None else t.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


# ----------------------------------------------------------------------------------------------------
# Synthetic samplers (spec §8). Beta components use exact inverse CDFs, so a uniform draw is all they need.


def draw_toy1(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 1): uniform over the five points {1/7, ..., 5/7}."""
    return (torch.randint(1, 6, (n, 1), generator=generator).to(torch.float32) / 7.0)


def draw_toy2(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 1), five equal parts: U[0.1, 0.2]; 0.3 + 0.1·Beta(1,5); mass at 0.5; 0.6 + 0.1·Beta(½,½); 0.8."""
    part = torch.randint(0, 5, (n,), generator=generator)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    beta_1_5 = 1.0 - (1.0 - u) ** (1.0 / 5.0)                 # inverse CDF of Beta(1, 5): 1 − (1 − x)^5
    arcsine = torch.sin(0.5 * math.pi * u) ** 2               # inverse CDF of Beta(½, ½): (2/π)·asin(√x)
    values = torch.stack([0.1 + 0.1 * u, 0.3 + 0.1 * beta_1_5, torch.full_like(u, 0.5), 0.6 + 0.1 * arcsine,
                          torch.full_like(u, 0.8)], dim=1)
    return values.gather(1, part[:, None]).to(torch.float32)


# mixture2d: four equal parts inside [0.1, 0.9]^2: three point masses and one uniform box.
MIXTURE2D_POINTS = ((0.2, 0.2), (0.2, 0.8), (0.8, 0.2))
MIXTURE2D_BOX = ((0.55, 0.9), (0.55, 0.9))                    # (x range, y range)


def draw_mixture2d(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2): with prob. ¼ each, one of MIXTURE2D_POINTS or a uniform draw from MIXTURE2D_BOX."""
    part = torch.randint(0, 4, (n,), generator=generator)
    u = torch.rand(n, 2, generator=generator)
    (x0, x1), (y0, y1) = MIXTURE2D_BOX
    box = torch.stack([x0 + (x1 - x0) * u[:, 0], y0 + (y1 - y0) * u[:, 1]], dim=1)
    points = torch.tensor(MIXTURE2D_POINTS, dtype=torch.float32)
    out = box.clone()
    is_point = part < len(MIXTURE2D_POINTS)
    out[is_point] = points[part[is_point]]
    return out


# ----------------------------------------------------------------------------------------------------
# File readers. Each raises DataError with one line naming the file and the problem.


def _resolve(path: str | None, root: str | Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or root is None else Path(root) / p


def _read_table(path: Path) -> np.ndarray:
    """A `.npy` or `.csv` file -> float64 (N, D); a 1-D array is one column; a non-numeric first CSV row is a
    header."""
    if not path.is_file():
        raise DataError(f"data.path={path}: file not found")
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix.lower() == ".csv":
            with path.open() as f:
                first = f.readline()
            try:
                [float(v) for v in first.strip().split(",")]
                skip = 0
            except ValueError:
                skip = 1
            arr = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
        else:
            raise DataError(f"data.path={path}: unsupported file type '{path.suffix}' (use .npy or .csv)")
    except DataError:
        raise
    except (ValueError, OSError) as e:
        raise DataError(f"data.path={path}: cannot read: {str(e).splitlines()[0]}") from None
    if arr.dtype.kind not in "biuf":
        raise DataError(f"data.path={path}: values must be numeric (got dtype {arr.dtype})")
    arr = arr.astype(np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] not in (1, 2):
        raise DataError(f"data.path={path}: expected rows = samples and 1 or 2 columns "
                        f"(got shape {arr.shape})")
    if len(arr) == 0:
        raise DataError(f"data.path={path}: no rows")
    return arr


def _check_range(arr: np.ndarray, path: Path, low: float, high: float) -> None:
    nan = np.isnan(arr)
    if nan.any():
        first = tuple(int(i) for i in np.argwhere(nan)[0])
        raise DataError(f"data.path={path}: {int(nan.sum())} NaN value(s), first at index {first}")
    bad = (arr < low) | (arr > high)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"data.path={path}: {int(bad.sum())} value(s) outside the declared range "
                        f"[data.low, data.high] = [{low:g}, {high:g}], first at index {first} "
                        f"(value {arr[first]:g})")


def _read_idx(path: Path) -> np.ndarray:
    """A gzipped idx file (MNIST format): uint8 array with the dimensions from its header."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"data.path={path}: cannot read idx file: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"data.path={path}: not an unsigned-byte idx file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise DataError(f"data.path={path}: header says {dims} = {math.prod(dims)} bytes, "
                        f"file has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


class _CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR-10 python batches without running arbitrary pickled code: only numpy arrays are allowed."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch -> (uint8 (N, 3, 32, 32), int64 (N,))."""
    try:
        with path.open("rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d["labels"], dtype=np.int64)
    except (OSError, EOFError, KeyError, AttributeError, ValueError, pickle.UnpicklingError) as e:
        raise DataError(f"data.path={path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"data.path={path}: expected data (N, 3072) and N labels "
                        f"(got {data.shape}, {labels.shape})")
    return data.reshape(-1, 3, 32, 32), labels  # rows hold the R, G, B planes in turn


# ----------------------------------------------------------------------------------------------------
# Builders (the DATASETS registry): builder(data_cfg, root) -> Dataset.


def _resize_bytes(x: np.ndarray, size: int | None, denom: float) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, C, size, size), rounded back to the storage grid k/denom so exact 0s and 1s
    stay exact (the boundary metrics count them)."""
    if not size or size == x.shape[-1]:
        return x
    t = torch.from_numpy(x).to(torch.float32)
    out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=size < x.shape[-1],
                        align_corners=False)
    return out.round().clamp(0, denom).to(torch.uint8).numpy()


def _image_dataset(name: str, cfg, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, denom: float) -> FiniteDataset:
    subset = getattr(cfg, "subset", None)
    if subset:
        if subset < 0:
            raise DataError(f"data.subset: must be >= 0 (got {subset})")
        train_x, train_y = train_x[:subset], train_y[:subset]
    size = getattr(cfg, "image_size", None)
    if size is not None and size < 1:
        raise DataError(f"data.image_size: must be >= 1 (got {size})")
    train_x, test_x = _resize_bytes(train_x, size, denom), _resize_bytes(test_x, size, denom)
    as_t = lambda a: torch.from_numpy(np.array(a, order="C"))  # a writable copy
    return FiniteDataset(name, "image", as_t(train_x), as_t(test_x), denom=denom,
                         train_labels=as_t(train_y.astype(np.int64)),
                         test_labels=as_t(test_y.astype(np.int64)),
                         scale=IMAGE_SCALE, shift=IMAGE_SHIFT)


def build_toy1(cfg, root=None) -> Dataset:
    return SyntheticDataset("toy1", "toy1d", (1,), draw_toy1)


def build_toy2(cfg, root=None) -> Dataset:
    return SyntheticDataset("toy2", "toy1d", (1,), draw_toy2)


def build_mixture2d(cfg, root=None) -> Dataset:
    return SyntheticDataset("mixture2d", "toy2d", (2,), draw_mixture2d)


def build_file(cfg, root=None) -> Dataset:
    """A user's `.npy`/`.csv` (rows = samples, 1 or 2 columns), declared raw range [low, high] -> [0, 1]."""
    if not getattr(cfg, "path", None):
        raise DataError("data.path: required when data.name=file")
    low, high = getattr(cfg, "low", None), getattr(cfg, "high", None)
    if low is None or high is None:
        raise DataError("data.low/data.high: a file's declared raw range is required when data.name=file")
    if not low < high:
        raise DataError(f"data.low: must be < data.high (got {low} >= {high})")
    path = _resolve(cfg.path, root)
    arr = _read_table(path)
    _check_range(arr, path, low, high)
    subset = getattr(cfg, "subset", None)
    if subset:
        arr = arr[:subset]
    x = torch.from_numpy(((arr - low) / (high - low)).clip(0.0, 1.0)).to(torch.float32)
    kind = "toy1d" if x.shape[1] == 1 else "toy2d"
    return FiniteDataset("file", kind, x)


def build_fashion_mnist(cfg, root=None) -> Dataset:
    """The four idx .gz files (60k train / 10k test, 1×28×28); x = byte/255."""
    d = _resolve(getattr(cfg, "path", None) or FASHION_MNIST_DIR, root)
    if not d.is_dir():
        raise DataError(f"data.path={d}: Fashion-MNIST directory not found (install it with "
                        f"`{FASHION_MNIST_APT}` or set data.path to a folder with the four idx .gz files)")
    parts = {}
    for split in ("train", "t10k"):
        for part, nd in (("images", 3), ("labels", 1)):
            f = d / f"{split}-{part}-idx{nd}-ubyte.gz"
            if not f.is_file():
                raise DataError(f"data.path={d}: missing {f.name} (expected the four Fashion-MNIST idx .gz "
                                f"files; `{FASHION_MNIST_APT}`)")
            parts[split, part] = _read_idx(f)
    for split in ("train", "t10k"):
        x, y = parts[split, "images"], parts[split, "labels"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"data.path={d}: {split} images {x.shape} and labels {y.shape} do not match")
    return _image_dataset("fashion_mnist", cfg, parts["train", "images"][:, None], parts["train", "labels"],
                          parts["t10k", "images"][:, None], parts["t10k", "labels"], 255.0)


DIGITS_TEST_EVERY = 5  # every 5th digit (index % 5 == 4) is held out: 1438 train / 359 test


def build_digits(cfg, root=None) -> Dataset:
    """scikit-learn's 1797 8×8 digits (17 grey levels, x = value/16), a fixed interleaved train/test split."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn; nothing is downloaded

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None]   # values 0..16
    y = bunch.target
    test = np.arange(len(x)) % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    return _image_dataset("digits", cfg, x[~test], y[~test], x[test], y[test], 16.0)


CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def build_cifar10(cfg, root=None) -> Dataset:
    """The CIFAR-10 python batches directory (data_batch_1..5, test_batch), 3×32×32, x = byte/255."""
    if not getattr(cfg, "path", None):
        raise DataError("data.path: required for cifar10 (the folder with data_batch_1..5 and test_batch)")
    d = _resolve(cfg.path, root)
    if not d.is_dir():
        raise DataError(f"data.path={d}: CIFAR-10 directory not found")
    missing = [n for n in (*CIFAR_TRAIN, "test_batch") if not (d / n).is_file()]
    if missing:
        raise DataError(f"data.path={d}: missing CIFAR-10 batch file(s) {', '.join(missing)}")
    train = [_read_cifar_batch(d / n) for n in CIFAR_TRAIN]
    test_x, test_y = _read_cifar_batch(d / "test_batch")
    return _image_dataset("cifar10", cfg, np.concatenate([x for x, _ in train]),
                          np.concatenate([y for _, y in train]), test_x, test_y, 255.0)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "toy1": build_toy1,
    "toy2": build_toy2,
    "mixture2d": build_mixture2d,
    "file": build_file,
    "fashion_mnist": build_fashion_mnist,
    "digits": build_digits,
    "cifar10": build_cifar10,
}


def make_dataset(data_cfg, root: str | Path | None = None) -> Dataset:
    """Build the dataset named by `data_cfg.name` (any object with the DataConfig attributes).

    `root`: the folder relative `data.path` values are resolved against (default: the working directory).
    Raises DataError (one line) for an unknown name or unusable data.
    """
    name = getattr(data_cfg, "name", None)
    if name not in DATASETS:
        raise DataError(f"data.name: unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    return DATASETS[name](data_cfg, root)
