"""Figures are valid PNGs of the expected pixel size; image grids hold the input pixels."""

import struct
import zlib
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import torch

from betadiff.data import FiniteDataset, make_dataset
from betadiff.plots import DPI, FIGSIZE, plot_samples, save_image_grid


def png_size(path):
    """(height, width) from a PNG's IHDR chunk, after checking the signature and the chunk's CRC."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", raw[8:16])
    assert kind == b"IHDR" and length == 13
    assert struct.unpack(">I", raw[29:33])[0] == zlib.crc32(raw[12:29])
    w, h = struct.unpack(">II", raw[16:24])
    assert raw.rstrip(b"\x00")[-8:-4] == b"IEND"
    return h, w


def cfg(name):
    return SimpleNamespace(name=name, path=None, low=None, high=None, image_size=None, subset=None)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_image_grid_pixels_roundtrip(tmp_path):
    x = torch.rand(10, 3, 5, 7, generator=gen())
    size = save_image_grid(x, tmp_path / "g.png", nrow=4, pad=2)
    expected = (3 * (5 + 2) + 2, 4 * (7 + 2) + 2)
    assert size == expected and png_size(tmp_path / "g.png") == expected
    img = matplotlib.image.imread(tmp_path / "g.png")[..., :3]          # (H, W, 3) in [0, 1]
    # tile 6 sits in row 1, column 2; each pixel is the input rounded to a grey level
    tile = img[2 + 7: 2 + 7 + 5, 2 + 2 * 9: 2 + 2 * 9 + 7]
    assert np.abs(tile - x[6].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
    assert np.all(img[:2] == 1.0) and np.all(img[-2:, -(2 * 9 + 2):] == 1.0)  # padding, empty tiles: white


def test_image_grid_grey_upscaled_and_clamped(tmp_path):
    x = torch.tensor([[[[-0.5, 0.25], [1.5, float("nan")]]]])             # one 1×2×2 image
    assert save_image_grid(x, tmp_path / "g.png", nrow=8, pad=1, upscale=3) == (1 + 6 + 1, 1 + 6 + 1)
    img = matplotlib.image.imread(tmp_path / "g.png")
    assert np.all(img[1:4, 1:4, :3] == 0.0) and np.all(img[4:7, 1:4, :3] == 1.0)
    assert np.allclose(img[1:4, 4:7, :3], round(0.25 * 255) / 255) and np.all(img[4:7, 4:7, :3] == 0.0)
    with pytest.raises(ValueError, match="expected"):
        save_image_grid(torch.rand(2, 2, 4, 4), tmp_path / "bad.png")


def test_plot_samples_image_grid(tmp_path):
    ds = FiniteDataset("tiny", "image", torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8), denom=255.0)
    plot_samples(ds, ds.sample(100, gen()), tmp_path / "s.png")
    tile = 8 * 4                                                         # 8×8 digits shown 4× larger
    assert png_size(tmp_path / "s.png") == (8 * (tile + 2) + 2, 8 * (tile + 2) + 2)


@pytest.mark.parametrize("name", ["toy1", "mixture2d"])
def test_plot_samples_toy(tmp_path, name):
    ds = make_dataset(cfg(name))
    g = ds.sample(5000, gen(1)) + 0.02 * torch.randn(5000, *ds.shape, generator=gen(2))
    plot_samples(ds, g, tmp_path / "a.png", true_raw=ds.reference(5000, gen(3)))
    plot_samples(ds, g, tmp_path / "b.png")                             # truth drawn from the dataset
    size = (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))
    assert png_size(tmp_path / "a.png") == size == png_size(tmp_path / "b.png")
    img = matplotlib.image.imread(tmp_path / "a.png")[..., :3]
    red = (img[..., 0] > 0.6) & (img[..., 1] < 0.4) & (img[..., 2] < 0.4)  # the generated samples (C3)
    grey = (np.ptp(img, axis=-1) < 0.02) & (img[..., 0] > 0.5) & (img[..., 0] < 0.9)  # the truth
    assert red.mean() > 1e-3 and grey.mean() > 1e-3
