"""Argument checks shared by the public functions: each names the argument
and what was expected, so bad input never turns into a silent broadcast."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# The distillation temperatures the losses support (fastdistill/kd/options.py says why).
TEMPERATURE_RANGE = (0.1, 20.0)


def tensor(name: str, x, *, floating: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {x.dtype}"
        )
    return x


def same_device(**tensors: torch.Tensor | None) -> None:
    named = [(k, v) for k, v in tensors.items() if v is not None]
    for k, v in named[1:]:
        if v.device != named[0][1].device:
            raise ValueError(
                f"{k} is on {v.device} but {named[0][0]} is on {named[0][1].device}; "
                "move them to the same device"
            )


def real(name: str, x, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in the given range (bounds closed unless *_open)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    lo_ok = low is None or (x > low if low_open else x >= low)
    hi_ok = high is None or (x < high if high_open else x <= high)
    if not math.isfinite(x) or not lo_ok or not hi_ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {x}")
    return x


def choice(name: str, x, options: tuple[str, ...]) -> str:
    if x not in options:
        raise ValueError(f"{name} must be one of {options}, got {x!r}")
    return x


def flag(name: str, x) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def labels_for(name: str, labels, leading_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Integer labels shaped like the logits without their last dimension."""
    tensor(name, labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(
            f"{name} must have shape {tuple(leading_shape)} (the logits without their last "
            f"dimension), got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the logits are on {device}")
    return labels


def temperature(x, name: str = "temperature") -> float:
    """A distillation temperature, in ``TEMPERATURE_RANGE``: outside it the
    divergences cancel to values float32 cannot resolve (and T² may overflow)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    lo, hi = TEMPERATURE_RANGE
    t = float(x)
    if not lo <= t <= hi:  # NaN fails too
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {t}: outside it the divergences "
                         "cancel to values float32 cannot resolve (and T² may overflow)")
    return t


def mixture_weights(name: str, x, n: int | None = None) -> list[float]:
    """Mixture weights: a list or tuple of finite real numbers >= 0, not all 0
    (and ``n`` of them, where given), as floats. Their users normalize them to
    sum 1, so only their ratios matter."""
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a list of real numbers (one per teacher), got "
                        f"{type(x).__name__}")
    if n is not None and len(x) != n:
        raise ValueError(f"{name} must have {n} entries (one per teacher), got {len(x)}")
    w = [real(f"{name}[{i}]", v, low=0.0) for i, v in enumerate(x)]
    total = sum(w)
    if not w or not total > 0:
        raise ValueError(f"{name} must not all be 0 (they are normalized to sum 1), got {list(x)!r}")
    if not math.isfinite(total):
        raise ValueError(f"{name} must have a finite sum (they are normalized to sum 1), got "
                         f"{list(x)!r}")
    return w
