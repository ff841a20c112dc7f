"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021).

DSA matches gradients of augmented real and synthetic batches, and the
augmentation must be the SAME transform on both sides and differentiable
w.r.t. the synthetic images. ``dsa(x, seed, strategy)`` draws every random
parameter from CPU generators seeded from ``seed`` and the op (so the draws do
not depend on the device), one set per sample in batch order: two calls with
the same seed transform sample i identically (the first min(n) samples of
batches of different sizes get the same transforms). Every op is a
differentiable function of x (affine resampling by ``grid_sample``, color
arithmetic, masks); no parameter depends on x.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .. import _checks

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
# DSA's published defaults
SATURATION, CONTRAST, BRIGHTNESS = 2.0, 0.5, 1.0
CROP_RATIO, CUTOUT_RATIO, SCALE_RATIO, ROTATE_DEGREES, FLIP_P = 0.125, 0.5, 1.2, 15.0, 0.5

__all__ = ["dsa", "DEFAULT_STRATEGY", "OPS"]


def _parse(strategy: str) -> list[str]:
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a str, got {type(strategy).__name__}")
    ops = [s for s in strategy.split("_") if s] if strategy not in ("", "none") else []
    bad = [s for s in ops if s not in OPS]
    if bad:
        raise ValueError(f"strategy {strategy!r}: unknown operation(s) {bad}; known: {OPS} "
                         "joined by '_'")
    return ops


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _rand(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64)


def _color(x, gen):
    n = x.shape[0]
    r = _rand(gen, 3 * n).view(n, 3)  # row i: sample i's draws, whatever n is
    bright = ((r[:, 0] - 0.5) * BRIGHTNESS).to(x)
    sat = (r[:, 1] * SATURATION).to(x)
    con = (r[:, 2] + CONTRAST).to(x)
    x = x + bright.view(-1, 1, 1, 1)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * sat.view(-1, 1, 1, 1) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * con.view(-1, 1, 1, 1) + mean


def _crop(x, gen):
    # translation by up to CROP_RATIO of the size, zero padding (grid_sample's default)
    n = x.shape[0]
    t = (_rand(gen, 2 * n).view(n, 2) * 2 - 1) * CROP_RATIO * 2  # in [-1, 1] grid units
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = t
    return _affine(x, theta.to(x.device))


def _scale(x, gen):
    n = x.shape[0]
    s = (_rand(gen, 2 * n).view(n, 2) - 0.5) * (SCALE_RATIO - 1 / SCALE_RATIO) + 1
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
    return _affine(x, theta.to(x.device))


def _rotate(x, gen):
    n = x.shape[0]
    a = (_rand(gen, n) - 0.5) * 2 * ROTATE_DEGREES * math.pi / 180
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
    theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
    return _affine(x, theta.to(x.device))


def _flip(x, gen):
    flip = (_rand(gen, x.shape[0]) < FLIP_P).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def _cutout(x, gen):
    # zero a window of CUTOUT_RATIO of each side, centred uniformly in the image
    n, _, h, w = x.shape
    ch, cw = max(1, round(h * CUTOUT_RATIO)), max(1, round(w * CUTOUT_RATIO))
    r = _rand(gen, 2 * n).view(n, 2)
    y0 = (r[:, 0] * h).long() - ch // 2
    x0 = (r[:, 1] * w).long() - cw // 2
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    inside = ((ys >= y0.view(-1, 1, 1)) & (ys < (y0 + ch).view(-1, 1, 1))
              & (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + cw).view(-1, 1, 1)))
    return x * (~inside).unsqueeze(1).to(device=x.device, dtype=x.dtype)


_FNS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale,
        "rotate": _rotate}


def dsa(x: torch.Tensor, seed: int, strategy: str = DEFAULT_STRATEGY) -> torch.Tensor:
    """Apply the DSA transforms of ``strategy`` ('_'-joined ops of
    color, crop, cutout, flip, scale, rotate, applied in that order of the
    string) to images x (B, C, H, W), with per-sample parameters drawn from
    ``seed``. The same seed gives the same transforms; differentiable in x."""
    _checks.tensor("x", x, floating=True)
    if x.dim() != 4:
        raise ValueError(f"x must be a batch of images (B, C, H, W), got {tuple(x.shape)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    ops = _parse(strategy)
    for op in ops:
        # one stream per op, drawn in sample order: sample i's parameters depend on
        # (seed, op, i) only, not on the batch size or the other ops of the strategy
        gen = torch.Generator().manual_seed((int(seed) * len(OPS) + OPS.index(op)) % (2**63))
        x = _FNS[op](x, gen)
    return x
