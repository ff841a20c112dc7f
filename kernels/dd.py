"""Triton backend of the gradient-matching distance (``fastdistill::segment_cosine_*``;
same contract as ``csrc/dd/dd_cpu.cpp``): one program per segment of the flat
gradient buffers, walked in ``BLOCK`` chunks; float32 loads, float32 sums."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _forward_kernel(a_ptr, b_ptr, off_ptr, stats_ptr, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    lo = tl.load(off_ptr + s)
    hi = tl.load(off_ptr + s + 1)
    dot = tl.zeros((BLOCK,), dtype=tl.float32)
    aa = tl.zeros((BLOCK,), dtype=tl.float32)
    bb = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(lo, hi, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        m = idx < hi
        x = tl.load(a_ptr + idx, mask=m, other=0.0)
        y = tl.load(b_ptr + idx, mask=m, other=0.0)
        dot += x * y
        aa += x * x
        bb += y * y
    tl.store(stats_ptr + 3 * s, tl.sum(dot, axis=0).to(tl.float64))
    tl.store(stats_ptr + 3 * s + 1, tl.sqrt(tl.sum(aa, axis=0)).to(tl.float64))
    tl.store(stats_ptr + 3 * s + 2, tl.sqrt(tl.sum(bb, axis=0)).to(tl.float64))


@triton.jit
def _backward_kernel(a_ptr, b_ptr, off_ptr, stats_ptr, grad_ptr, da_ptr, db_ptr, eps,
                     BLOCK: tl.constexpr):
    s = tl.program_id(0)
    lo = tl.load(off_ptr + s)
    hi = tl.load(off_ptr + s + 1)
    g = tl.load(grad_ptr).to(tl.float64)
    dot = tl.load(stats_ptr + 3 * s)
    na = tl.load(stats_ptr + 3 * s + 1)
    nb = tl.load(stats_ptr + 3 * s + 2)
    D = na * nb + eps
    k = (-g / D).to(tl.float32)
    ca = tl.where(na > 0, g * dot * nb / (tl.where(na > 0, na, 1.0) * D * D), 0.0).to(tl.float32)
    cb = tl.where(nb > 0, g * dot * na / (tl.where(nb > 0, nb, 1.0) * D * D), 0.0).to(tl.float32)
    for i in range(lo, hi, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        m = idx < hi
        x = tl.load(a_ptr + idx, mask=m, other=0.0)
        y = tl.load(b_ptr + idx, mask=m, other=0.0)
        tl.store(da_ptr + idx, k * y + ca * x, mask=m)
        tl.store(db_ptr + idx, k * x + cb * y, mask=m)


def _check(op: str, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> None:
    if a.dim() != 1 or b.shape != a.shape:
        raise ValueError(f"{op}: a and b must be flat tensors of the same length")
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise TypeError(f"{op}: a and b must be float32")
    if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype != torch.int64:
        raise ValueError(f"{op}: offsets must be an int64 (S + 1,) tensor")


def segment_cosine_forward(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(S, 3) float64 [dot, |a|, |b|] per segment."""
    _check("segment_cosine_forward", a, b, offsets)
    a, b, offsets = a.contiguous(), b.contiguous(), offsets.contiguous()
    S = offsets.numel() - 1
    stats = torch.empty((S, 3), dtype=torch.float64, device=a.device)
    if S:
        _forward_kernel[(S,)](a, b, offsets, stats, BLOCK=BLOCK)
    return stats


def segment_cosine_backward(a, b, offsets, stats, grad, eps: float):
    """(da, db) of Σ_s (1 − dot_s / (|a_s||b_s| + eps)) times grad."""
    _check("segment_cosine_backward", a, b, offsets)
    a, b, offsets = a.contiguous(), b.contiguous(), offsets.contiguous()
    da, db = torch.zeros_like(a), torch.zeros_like(b)
    S = offsets.numel() - 1
    if S:
        _backward_kernel[(S,)](a, b, offsets, stats.contiguous(), grad.reshape(1).contiguous(), da, db,
                               float(eps), BLOCK=BLOCK)
    return da, db
