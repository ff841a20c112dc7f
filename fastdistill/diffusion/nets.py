"""Small class-conditional denoisers: a UNet for 8×8 and 28×28 digits and an
MLP for 2-D toys. Both map (x_t, t, labels) to the prediction of their
parameterization; label ``num_classes`` is the null class of classifier-free
guidance (``labels=None`` means it for the whole batch)."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, num_steps: int) -> torch.Tensor:
    """Sinusoidal features of t/num_steps (t = -1, the clean end, is allowed)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    u = (t.float() + 1) / num_steps * 1000.0
    ang = u[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class _Conditioning(nn.Module):
    """The time and class embedding every block adds."""

    def __init__(self, num_classes: int | None, num_steps: int, dim: int):
        super().__init__()
        self.num_classes, self.num_steps, self.dim = num_classes, num_steps, dim
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = None if num_classes is None else nn.Embedding(num_classes + 1, dim)

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        e = self.time(timestep_embedding(t, self.dim, self.num_steps))
        if self.label is not None:
            if labels is None:
                labels = torch.full_like(t, self.num_classes)
            e = e + self.label(labels)
        return e


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(min(8, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, e):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(e))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DigitUNet(nn.Module):
    """A two-level UNet: residual blocks at full and half resolution and a
    middle at quarter resolution (8×8 → 4 → 2, 28×28 → 14 → 7)."""

    def __init__(self, image_shape=(1, 8, 8), num_classes: int | None = 10, *,
                 num_steps: int = 1000, width: int = 32):
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"image height and width must be multiples of 4, got {h}×{w}")
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        emb = 4 * width
        self.cond = _Conditioning(num_classes, num_steps, emb)
        self.inp = nn.Conv2d(c, width, 3, padding=1)
        self.down1 = _ResBlock(width, width, emb)
        self.down2 = _ResBlock(width, 2 * width, emb)
        self.mid = _ResBlock(2 * width, 2 * width, emb)
        self.up2 = _ResBlock(4 * width, 2 * width, emb)
        self.up1 = _ResBlock(3 * width, width, emb)
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, c, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, labels=None):
        e = self.cond(t, labels)
        h1 = self.down1(self.inp(x), e)                      # H
        h2 = self.down2(F.avg_pool2d(h1, 2), e)              # H/2
        m = self.mid(F.avg_pool2d(h2, 2), e)                 # H/4
        u2 = self.up2(torch.cat([F.interpolate(m, scale_factor=2.0), h2], 1), e)
        u1 = self.up1(torch.cat([F.interpolate(u2, scale_factor=2.0), h1], 1), e)
        return self.out(u1)


class MLPDenoiser(nn.Module):
    """For points (B, dim): three SiLU layers with the conditioning added."""

    def __init__(self, dim: int = 2, num_classes: int | None = None, *, num_steps: int = 1000,
                 width: int = 128):
        super().__init__()
        self.image_shape, self.num_classes = (dim,), num_classes
        self.cond = _Conditioning(num_classes, num_steps, width)
        self.inp = nn.Linear(dim, width)
        self.hidden = nn.ModuleList([nn.Linear(width, width) for _ in range(3)])
        self.out = nn.Linear(width, dim)

    def forward(self, x, t, labels=None):
        e = self.cond(t, labels)
        h = self.inp(x)
        for layer in self.hidden:
            h = h + layer(F.silu(h + e))
        return self.out(F.silu(h))
