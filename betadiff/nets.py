"""Backbone networks. They know nothing of diffusion: `net(x, c) -> y` with x, y: (B, *D), c: (B,).

`c` is a per-sample conditioning scalar (the preconditioner passes t for the toy MLP and c_noise for images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_embedding(c: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim): [sin, cos] of scale·c / max_period^(2k/dim), k = 0..dim/2−1 (spec §6)."""
    half = dim // 2
    k = torch.arange(half, device=c.device, dtype=torch.float32)
    freqs = max_period ** (-2.0 * k / dim)
    ang = scale * c.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1).to(c.dtype if c.is_floating_point() else torch.float32)


class MLP(nn.Module):
    """Toy network (spec §6): [x (D values), emb(c) (emb_dim)] → width → … → D, ReLU."""

    def __init__(self, data_dim: int = 1, width: int = 256, depth: int = 2, emb_dim: int = 20):
        super().__init__()
        self.emb_dim = emb_dim
        layers: list[nn.Module] = []
        d = data_dim + emb_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, data_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = torch.cat([x.reshape(shape[0], -1), sinusoidal_embedding(c, self.emb_dim).to(x.dtype)], dim=1)
        return self.net(h).reshape(shape)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) if ch >= 8 else 1, ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, 2 * cout)  # FiLM (scale, shift) from the noise embedding
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.drop(h))


class Attention(nn.Module):
    def __init__(self, ch: int, heads: int = 1):
        super().__init__()
        self.heads, self.norm = heads, _norm(ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)  # (B, h, c, HW)
        y = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(y.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """A DDPM++-style U-Net sized for CPU: width `channels`, levels `channel_mult`, `num_res_blocks` per level,
    self-attention at the resolutions in `attn_resolutions`. Input/output (B, C, H, W); any H, W (odd sizes are
    handled by interpolating the upsampled map to the skip's size)."""

    def __init__(self, in_channels: int = 1, resolution: int = 28, channels: int = 32,
                 channel_mult: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                 attn_resolutions: tuple[int, ...] = (7,), dropout: float = 0.0, emb_dim: int | None = None):
        super().__init__()
        emb_dim = emb_dim or 4 * channels
        self.channels = channels
        self.emb = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        chans, ch, res = [channels], channels, resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blk = nn.ModuleList([ResBlock(ch, channels * mult, emb_dim, dropout)])
                ch = channels * mult
                if res in attn_resolutions:
                    blk.append(Attention(ch))
                self.down.append(blk)
                chans.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                chans.append(ch)
                res = (res + 1) // 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), Attention(ch), ResBlock(ch, ch, emb_dim, dropout)])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                blk = nn.ModuleList([ResBlock(ch + chans.pop(), channels * mult, emb_dim, dropout)])
                ch = channels * mult
                if res in attn_resolutions:
                    blk.append(Attention(ch))
                self.up.append(blk)
            if level > 0:
                self.up.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, padding=1)]))  # applied after upsampling
                res = res * 2
        self.norm_out, self.conv_out = _norm(ch), nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        emb = self.emb(sinusoidal_embedding(c, self.channels, scale=1.0).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for blk in self.down:
            if isinstance(blk[0], ResBlock):
                h = blk[0](h, emb)
                for extra in blk[1:]:
                    h = extra(h)
            else:
                h = blk[0](h)
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for blk in self.up:
            if isinstance(blk[0], ResBlock):
                h = blk[0](torch.cat([h, skips.pop()], dim=1), emb)
                for extra in blk[1:]:
                    h = extra(h)
            else:  # upsample to the next skip's spatial size, then conv
                h = blk[0](F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def num_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def make_net(model_cfg, shape: tuple[int, ...]) -> nn.Module:
    """Build the backbone named by `model_cfg.arch` for per-sample data of `shape`."""
    if model_cfg.arch == "mlp":
        return MLP(int(math.prod(shape)), model_cfg.width, model_cfg.depth, model_cfg.emb_dim)
    if model_cfg.arch == "unet":
        if len(shape) != 3:
            raise ValueError(f"model.arch=unet needs image data (C, H, W), got per-sample shape {shape}")
        return UNet(shape[0], shape[-1], model_cfg.channels, tuple(model_cfg.channel_mult), model_cfg.num_res_blocks,
                    tuple(model_cfg.attn_resolutions), model_cfg.dropout)
    raise ValueError(f"unknown model.arch '{model_cfg.arch}'")
