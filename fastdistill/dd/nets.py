"""The standard network of dataset distillation (DC/DSA/DM/MTT papers):
ConvNet-3, width 128, instance norm, ReLU, 2×2 average pooling, linear head."""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks


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
                       nn.ReLU(inplace=False), nn.AvgPool2d(2)]
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
