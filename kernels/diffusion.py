"""Triton backend of the diffusion-distillation ops (``fastdistill::dmd_forward``,
``denoising_forward``, ``consistency_forward``, ``ddim_affine``).

Same contract as the C++ CPU kernels (``csrc/diffusion/diffusion_cpu.cpp``;
the spec is ``fastdistill/reference/diffusion.py``): a batch of B samples of
n elements, flattened (B, n) and contiguous, per-sample float32 coefficients
(B,), float32 arithmetic on inputs of any of float32/bf16/fp16. The grid is
(sample, chunk) flattened to one axis: each program owns ``BLOCK`` elements of
one sample and writes its partial sums to a (B, chunks, 2) float32 buffer,
which a tiny torch sum reduces per sample. The two-pass ops (DMD's normalizer,
the pseudo-Huber norm) launch one kernel per pass with the per-sample
constant computed in between; each pass reads the data once, and the gradient
is written by the last pass (no autograd graph, no temporaries of the batch's
size besides it).

Each loss returns (value per sample (B,) float32, gradient in the first
input's dtype, or empty without ``need_grad``), as the C++ ops do.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EPS, _X0, _V = range(3)  # fastdistill.reference.diffusion.PREDICTIONS
_L2, _PSEUDO_HUBER = range(2)  # METRICS


# ---------------------------------------------------------------------- kernels
@triton.jit
def _dmd_pass1(X, R, PART, n, chunks, BLOCK: tl.constexpr):
    """PART[s, c] = (Σ |x − x0_real|, Σ (x − x)) over the chunk (the second is
    0, or NaN where some x is not finite)."""
    pid = tl.program_id(0).to(tl.int64)
    s = pid // chunks
    idx = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    off = s * n + idx
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(PART + 2 * pid, tl.sum(tl.abs(x - r), axis=0))
    tl.store(PART + 2 * pid + 1, tl.sum(x - x, axis=0))


@triton.jit
def _dmd_pass2(R, F, NORM, COEF, G, PART, n, chunks, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """g = (x0_fake − x0_real) / norm: PART[s, c] = (Σ g², Σ (g − g)), G = coef·g."""
    pid = tl.program_id(0).to(tl.int64)
    s = pid // chunks
    idx = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    off = s * n + idx
    r = tl.load(R + off, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(F + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.where(mask, (f - r) / tl.load(NORM + s), 0.0)
    tl.store(PART + 2 * pid, tl.sum(g * g, axis=0))
    tl.store(PART + 2 * pid + 1, tl.sum(g - g, axis=0))
    if NEED_GRAD:
        tl.store(G + off, (g * tl.load(COEF + s)).to(G.dtype.element_ty), mask=mask)


@triton.jit
def _denoising_kernel(P, X0, N, ALPHA, SIGMA, COEF, G, PART, n, chunks, PRED: tl.constexpr,
                      NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """r = pred − target: PART[s, c] = Σ r², G = coef·r."""
    pid = tl.program_id(0).to(tl.int64)
    s = pid // chunks
    idx = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    off = s * n + idx
    p = tl.load(P + off, mask=mask, other=0.0).to(tl.float32)
    if PRED == 0:
        y = tl.load(N + off, mask=mask, other=0.0).to(tl.float32)
    elif PRED == 1:
        y = tl.load(X0 + off, mask=mask, other=0.0).to(tl.float32)
    else:  # v = α ε − σ x0
        a = tl.load(ALPHA + s)
        sg = tl.load(SIGMA + s)
        y = (a * tl.load(N + off, mask=mask, other=0.0).to(tl.float32)
             - sg * tl.load(X0 + off, mask=mask, other=0.0).to(tl.float32))
    r = p - y
    tl.store(PART + 2 * pid, tl.sum(r * r, axis=0))
    tl.store(PART + 2 * pid + 1, 0.0)
    if NEED_GRAD:
        tl.store(G + off, (r * tl.load(COEF + s)).to(G.dtype.element_ty), mask=mask)


@triton.jit
def _consistency_kernel(P, Y, XT, CSKIP, COUT, COEF, G, PART, n, chunks, BOUNDARY: tl.constexpr,
                        WRITE: tl.constexpr, BLOCK: tl.constexpr):
    """r = c_skip·x_t + c_out·pred − target (pred − target without x_t):
    PART[s, c] = Σ r², G = coef·r."""
    pid = tl.program_id(0).to(tl.int64)
    s = pid // chunks
    idx = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    off = s * n + idx
    f = tl.load(P + off, mask=mask, other=0.0).to(tl.float32)
    if BOUNDARY:
        xt = tl.load(XT + off, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(CSKIP + s) * xt + tl.load(COUT + s) * f
    r = f - tl.load(Y + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(PART + 2 * pid, tl.sum(r * r, axis=0))
    tl.store(PART + 2 * pid + 1, 0.0)
    if WRITE:
        tl.store(G + off, (r * tl.load(COEF + s)).to(G.dtype.element_ty), mask=mask)


@triton.jit
def _affine_kernel(X, A, Y, B, Z, C, OUT, n, chunks, HAS_Y: tl.constexpr, HAS_Z: tl.constexpr,
                   BLOCK: tl.constexpr):
    """OUT = a·x + b·y + c·z per sample."""
    pid = tl.program_id(0).to(tl.int64)
    s = pid // chunks
    idx = (pid % chunks) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    off = s * n + idx
    v = tl.load(A + s) * tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        v += tl.load(B + s) * tl.load(Y + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        v += tl.load(C + s) * tl.load(Z + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + off, v.to(OUT.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------- launchers
def _batch(op: str, name: str, x: torch.Tensor) -> tuple[int, int]:
    if x.dim() < 1 or x.shape[0] < 1 or x.numel() == 0:
        raise ValueError(f"{op}: {name} must be a non-empty batch (B, ...), got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {x.dtype}")
    return x.shape[0], x.numel() // x.shape[0]


def _like(op: str, name: str, y: torch.Tensor | None, x: torch.Tensor) -> None:
    if y is None:
        return
    if y.shape != x.shape or not y.is_contiguous() or y.device != x.device:
        raise ValueError(f"{op}: {name} must be contiguous, with shape {tuple(x.shape)} on {x.device}")
    if y.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {y.dtype}")


def _coef(op: str, name: str, c: torch.Tensor | None, B: int, device) -> None:
    if c is None:
        return
    if (c.shape != (B,) or c.dtype != torch.float32 or not c.is_contiguous()
            or c.device != device):
        raise ValueError(f"{op}: {name} must be a contiguous float32 tensor of shape ({B},) "
                         f"on {device}")


def _grid(B: int, n: int) -> tuple[int, int, int]:
    """(BLOCK, chunks per sample, num_warps)."""
    block = min(MAX_BLOCK, triton.next_power_of_2(n))
    return block, triton.cdiv(n, block), 8 if block >= 2048 else 4


def _gradient(x: torch.Tensor, need_grad: bool) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad else x.new_empty(0)


def dmd_forward(x, x0_real, x0_fake, weight, grad_scale: float, eps: float, need_grad: bool):
    """(½ w Σ g² per sample, grad_scale·w·g) with g = (x0_fake − x0_real) /
    max(mean|x − x0_real|, eps); see csrc/ops.cpp."""
    op = "dmd_forward"
    B, n = _batch(op, "x", x)
    _like(op, "x0_real", x0_real, x)
    _like(op, "x0_fake", x0_fake, x)
    _coef(op, "weight", weight, B, x.device)
    block, chunks, warps = _grid(B, n)
    part1 = torch.empty((B, chunks, 2), dtype=torch.float32, device=x.device)
    _dmd_pass1[(B * chunks,)](x, x0_real, part1, n, chunks, BLOCK=block, num_warps=warps)
    s1 = part1.sum(1)
    norm = (s1[:, 0] / n).clamp_min(eps)
    w = weight if weight is not None else torch.ones(B, dtype=torch.float32, device=x.device)
    coef = w * grad_scale
    grad = _gradient(x, need_grad)
    part2 = torch.empty_like(part1)
    _dmd_pass2[(B * chunks,)](x0_real, x0_fake, norm, coef, grad if need_grad else part2, part2, n,
                              chunks, NEED_GRAD=need_grad, BLOCK=block, num_warps=warps)
    s2 = part2.sum(1)
    return 0.5 * w * s2[:, 0] + w * (s1[:, 1] + s2[:, 1]), grad


def denoising_forward(pred, x0, noise, alpha, sigma, weight, prediction: int, grad_scale: float,
                      need_grad: bool):
    """(w Σ (pred − target)² per sample, its gradient times grad_scale); see csrc/ops.cpp."""
    op = "denoising_forward"
    B, n = _batch(op, "pred", pred)
    if prediction not in (_EPS, _X0, _V):
        raise ValueError(f"{op}: unknown prediction {prediction}")
    if (prediction != _EPS and x0 is None) or (prediction != _X0 and noise is None):
        raise ValueError(f"{op}: this prediction needs {'x0' if x0 is None else 'noise'}")
    _like(op, "x0", x0, pred)
    _like(op, "noise", noise, pred)
    for name, c in (("alpha", alpha), ("sigma", sigma), ("weight", weight)):
        _coef(op, name, c, B, pred.device)
    block, chunks, warps = _grid(B, n)
    part = torch.empty((B, chunks, 2), dtype=torch.float32, device=pred.device)
    grad = _gradient(pred, need_grad)
    _denoising_kernel[(B * chunks,)](
        pred, pred if x0 is None else x0, pred if noise is None else noise, alpha, sigma,
        2.0 * weight * grad_scale, grad if need_grad else part, part, n, chunks, PRED=prediction,
        NEED_GRAD=need_grad, BLOCK=block, num_warps=warps)
    return weight * part[:, :, 0].sum(1), grad


def consistency_forward(pred, target, x_t, c_skip, c_out, weight, metric: int, c: float,
                        grad_scale: float, need_grad: bool):
    """("l2": w Σ r², "pseudo_huber": w (√(Σ r² + c²) − c) per sample, the
    gradient times grad_scale); see csrc/ops.cpp."""
    op = "consistency_forward"
    B, n = _batch(op, "pred", pred)
    _like(op, "target", target, pred)
    if metric not in (_L2, _PSEUDO_HUBER):
        raise ValueError(f"{op}: unknown metric {metric}")
    if metric == _PSEUDO_HUBER and not c > 0:
        raise ValueError(f"{op}: c must be > 0")
    if not (x_t is None) == (c_skip is None) == (c_out is None):
        raise ValueError(f"{op}: x_t, c_skip and c_out go together")
    _like(op, "x_t", x_t, pred)
    for name, v in (("c_skip", c_skip), ("c_out", c_out), ("weight", weight)):
        _coef(op, name, v, B, pred.device)
    device = pred.device
    w = weight if weight is not None else torch.ones(B, dtype=torch.float32, device=device)
    co = c_out if c_out is not None else torch.ones(B, dtype=torch.float32, device=device)
    block, chunks, warps = _grid(B, n)
    part = torch.empty((B, chunks, 2), dtype=torch.float32, device=device)
    grad = _gradient(pred, need_grad)
    boundary = x_t is not None

    def sweep(coef, write):
        _consistency_kernel[(B * chunks,)](
            pred, target, x_t if boundary else pred, c_skip if boundary else w,
            co, coef, grad if write else part, part, n, chunks, BOUNDARY=boundary, WRITE=write,
            BLOCK=block, num_warps=warps)
        return part[:, :, 0].sum(1)

    if metric == _L2:
        return w * sweep(2.0 * w * co * grad_scale, need_grad), grad
    d = sweep(w, False).double()  # pass 1: Σ r²
    q = torch.sqrt(d + c * c)
    if need_grad:
        sweep((w * co * grad_scale / q).float(), True)
    # √(D + c²) − c = D / (√(D + c²) + c), without the cancellation at small D
    value = torch.where(torch.isfinite(d), d / (q + c), q - c)
    return (w * value).float(), grad


def ddim_affine(x, a, y, b, z, c, dtype: torch.dtype):
    """a·x + b·y + c·z per sample (the y / z terms optional), in ``dtype``."""
    op = "ddim_affine"
    B, n = _batch(op, "x", x)
    if (y is None) != (b is None) or (z is None) != (c is None):
        raise ValueError(f"{op}: each term needs its coefficient")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be float32, bfloat16 or float16, got {dtype}")
    _like(op, "y", y, x)
    _like(op, "z", z, x)
    for name, v in (("a", a), ("b", b), ("c", c)):
        _coef(op, name, v, B, x.device)
    block, chunks, warps = _grid(B, n)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    _affine_kernel[(B * chunks,)](
        x, a, x if y is None else y, a if b is None else b, x if z is None else z,
        a if c is None else c, out, n, chunks, HAS_Y=y is not None, HAS_Z=z is not None,
        BLOCK=block, num_warps=warps)
    return out
