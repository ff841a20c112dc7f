"""The standard network of dataset distillation (DC/DSA/DM/MTT papers):
ConvNet-3, width 128, instance norm, ReLU, 2×2 average pooling, linear head."""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks


def _pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """Mean of each 2×2 window over the last two dims (odd edges dropped), as
    two adds of strided views: vectorized, where ATen's avg_pool2d CPU kernel
    sums every window in a scalar loop (~3x slower here)."""
    h2, w2 = x.shape[-2] // 2, x.shape[-1] // 2
    rows = x[..., 0:2 * h2:2, :2 * w2] + x[..., 1:2 * h2:2, :2 * w2]
    return (rows[..., 0::2] + rows[..., 1::2]).mul_(0.25)


def _spread_2x2(g: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The adjoint of _pool_2x2: g/4 copied to each cell of its window
    ((..., h, w), zeros on a dropped odd edge); four strided copies, where
    avg_pool2d_backward scatters one element at a time."""
    h2, w2 = g.shape[-2], g.shape[-1]
    out = g.new_empty(*g.shape[:-2], h2, 2, w2, 2)
    quarter = g * 0.25
    for i in (0, 1):
        for j in (0, 1):
            out[..., i, :, j] = quarter
    out = out.view(*g.shape[:-2], 2 * h2, 2 * w2)
    if (h, w) != (2 * h2, 2 * w2):
        out = nn.functional.pad(out, (0, w - 2 * w2, 0, h - 2 * h2))
    return out


def _leading_batch(x: torch.Tensor, in_dim) -> torch.Tensor:
    # vmap rule of the two functions below: they act on the last two dims,
    # so a vmapped batch dim is just one more leading dim
    return x if in_dim is None else x.movedim(in_dim, 0)


class _Pool2x2(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return _pool_2x2(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.hw = tuple(inputs[0].shape[-2:])

    @staticmethod
    def backward(ctx, g):
        return _Spread2x2.apply(g, *ctx.hw)

    @staticmethod
    def vmap(info, in_dims, x):
        return _Pool2x2.apply(_leading_batch(x, in_dims[0])), 0


class _Spread2x2(torch.autograd.Function):
    @staticmethod
    def forward(g, h, w):
        return _spread_2x2(g, h, w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, gg):
        return _Pool2x2.apply(gg), None, None

    @staticmethod
    def vmap(info, in_dims, g, h, w):
        return _Spread2x2.apply(_leading_batch(g, in_dims[0]), h, w), 0


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2)`` with a vectorized forward and backward (both linear
    maps, each the other's adjoint, so every order of derivative and
    torch.func's vmap/grad work)."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4) or x.shape[-2] < 2 or x.shape[-1] < 2:
            return super().forward(x)  # avg_pool2d's own error for these
        return _Pool2x2.apply(x)


class ConvNet(nn.Module):
    """ConvNet-D: D blocks of [3×3 conv (padding 1) → instance norm → ReLU →
    2×2 average pool], then a linear classifier on the flattened features.

    Instance norm is ``GroupNorm(width, width, affine=True)`` (one group per
    channel), as the reference code builds it: it normalizes each sample on
    its own, so per-sample and per-group gradients are exact (batch norm in
    training mode would mix the samples). ``embed(x)`` returns the features
    before the classifier (DM's and DataDAM's embedding).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 128,
                 depth: int = 3, image_size: int | tuple[int, int] = 28):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("num_classes", num_classes),
                        ("width", width), ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(depth):
            if h < 2 or w < 2:
                raise ValueError(f"image_size {image_size} is too small for depth={depth} "
                                 "(each block halves it)")
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=False), AvgPool2x2()]
            c, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * h * w, num_classes)
        self.image_size = (int(image_size), int(image_size)) if isinstance(image_size, int) \
            else tuple(image_size)
        self.in_channels = in_channels

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        _checks.tensor("x", x, floating=True)
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"x must have shape (B, {self.in_channels}, {self.image_size[0]}, "
                             f"{self.image_size[1]}), got {tuple(x.shape)}")
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
